"""The "My devices" portal: web pages for people, on the HTTP listener at ``portal.path``.

See docs/portal.md. Sign-in by OpenID Connect (authorization code + PKCE), tokens
kept on the server; every page does what the ownership API does, by calling it.
"""
