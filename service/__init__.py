"""The callback and inbound service: receipts and replies in, stored before the 2xx."""
