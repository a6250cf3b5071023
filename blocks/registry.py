"""Load a saved Block by name: ``"slug/name"`` or a bare name searched among our block types."""
from __future__ import annotations

from prefect.blocks.core import Block

from blocks.amocrm import AmoCrm
from blocks.bitrix24 import Bitrix24Crm
from blocks.crm import CrmSource, CsvCrm, SqlCrm
from blocks.hubspot import HubSpotCrm
from blocks.gateway import SandboxGateway, SmsGateway
from blocks.http_gateway import HttpGateway
from blocks.kannel import KannelGateway
from blocks.smpp import SmppGateway

CRM_TYPES: tuple[type[CrmSource], ...] = (SqlCrm, CsvCrm, AmoCrm, Bitrix24Crm, HubSpotCrm)
GATEWAY_TYPES: tuple[type[SmsGateway], ...] = (SandboxGateway, HttpGateway, KannelGateway, SmppGateway)


def _load(name: str, types, kind: str):
    if "/" in name:
        block = Block.load(name)
        if not isinstance(block, tuple(types)):
            raise TypeError(f"block '{name}' is a {type(block).__name__}, not a {kind}")
        return block
    errors = []
    for t in types:
        try:
            block = t.load(name)
            block._block_document_name = name  # noqa: SLF001 - keep the name for logs/reports
            return block
        except ValueError as exc:
            errors.append(str(exc))
    raise ValueError(f"no {kind} block named '{name}' (looked in: {', '.join(t.get_block_type_slug() for t in types)}); "
                     f"save one first, e.g. with `smsflow` or the Prefect UI")


def load_crm(name: str) -> CrmSource:
    return _load(name, CRM_TYPES, "CRM source")


def load_gateway(name: str) -> SmsGateway:
    return _load(name, GATEWAY_TYPES, "SMS gateway")
