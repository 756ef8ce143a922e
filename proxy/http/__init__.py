"""The HTTP gateway in front of FIWARE Orion (NGSI-v2).

Layers, outermost first: :mod:`.listener` (aiohttp's server with deadlines for
slow clients), :mod:`.gateway` (the request handler and pooled client:
``create_gateway_app``, ``HttpGateway``), :mod:`.auth` (bearer token, device
key, device certificate, anonymous), :mod:`.ngsi` (sans-IO body parsing and
request analysis),
:mod:`.plan` (sans-IO authorization and query rewriting), :mod:`.patterns`
(safe local ``idPattern`` evaluation). Notification targets are checked by
:mod:`proxy.ssrf`, below this package: the configuration checks its allow-list too.
"""
