"""keygate: a security gateway for IoT brokers (MQTT and NGSI-v2)."""

__version__ = "0.1.0"
