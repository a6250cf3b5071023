"""Prefect Blocks: each external system is one abstract interface with real and sandbox implementations."""
from blocks.crm import CrmSource, CsvCrm, SqlCrm
from blocks.gateway import SandboxGateway, SmsGateway

__all__ = ["CrmSource", "CsvCrm", "SqlCrm", "SandboxGateway", "SmsGateway"]
