"""Who is calling: access tokens, device keys, device certificates."""

from proxy.identity.model import AuthError, AuthReason, Identity

__all__ = ["AuthError", "AuthReason", "Identity"]
