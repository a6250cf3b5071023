"""Prefect Blocks: each external system is one abstract interface with real and sandbox implementations.

Import the module you need (``blocks.crm``, ``blocks.gateway``, ...): this package imports none of them, so
that a module importing a leaf of it (or ``smsflow.exports``' plain export reader) does not import Prefect.
"""
