"""sovereign-ops: status, history and rollback of the sovereign.mlops inference fleet."""

__version__ = "0.1.0"
