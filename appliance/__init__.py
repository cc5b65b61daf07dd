"""The appliance core: settings, database, model store, inference, access control, CLI."""

__version__ = "0.1.0"
