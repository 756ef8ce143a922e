"""keygate ownership: the encrypted store of devices, keys and delegations, its
in-memory read path, and the REST API users manage them with."""
