"""``smsflow``: the command line for data teams (and for tools that drive the project).

Output contracts: ``sms-info`` prints one JSON object; ``campaign`` prints one JSON object
as its last stdout line; ``validate`` writes a CSV and exits 0 even when rows are bad.
Logs go to stderr.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Optional

import typer

class _Console(typer.Typer):
    """The ``smsflow`` command (``app()`` from the console script or ``python -m smsflow.cli``). A command may ask
    to end without the interpreter's teardown (``_STATE["fast_exit"]``, a preview: ``_exit_now``); only this
    entry point honours it, never a caller that invokes the commands in its own process (tests, CliRunner)."""

    def __call__(self, *args, **kwargs):
        _STATE["console"] = True
        try:
            return super().__call__(*args, **kwargs)
        except SystemExit as exc:
            if _STATE.get("fast_exit") and not exc.code:
                _exit_now(0)
            raise


_STATE: dict[str, bool] = {}
app = _Console(add_completion=False, no_args_is_help=True, help="CRM-to-SMS campaign pipelines on Prefect 3.")

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@contextmanager
def _prefect_session():
    """For commands that talk to Prefect: SIGTERM unwinds like Ctrl-C, the temporary Prefect API
    (when no server is configured) is a child of this process that ends with it, and a failure is
    reported in one line (tracebacks stay in the run's logs; SMSFLOW_TRACEBACKS=1 shows them here)."""
    from smsflow.processes import CLI_HEARTBEAT_S, CLI_TAG, console_without_tracebacks, embedded_prefect_api, exit_on_signals

    exit_on_signals()
    if not os.environ.get("PREFECT_API_URL"):
        from smsflow import progress

        progress.step("prefect", "starting a temporary local Prefect API (set PREFECT_API_URL to use a server)")
    with embedded_prefect_api() as temporary, ExitStack() as stack:
        if temporary is None:
            # a Prefect server: the runs of this command carry the tag the "crash command runs" automation watches
            # (deployments/automations.py) and heartbeat at the most frequent interval Prefect allows (30 s), so a
            # command killed with -9 leaves no run Running for ever
            from prefect import tags
            from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

            stack.enter_context(tags(CLI_TAG))
            stack.enter_context(temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: CLI_HEARTBEAT_S}))
        if not os.environ.get("SMSFLOW_TRACEBACKS"):
            console_without_tracebacks()
        yield


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@app.command("sms-info")
def sms_info_cmd(text: str = typer.Argument(..., help="Message text")) -> None:
    """Encoding, characters, units and segments of a message, as one JSON object."""
    from smsflow.sms_encoding import sms_info

    typer.echo(json.dumps(sms_info(text).to_dict(), ensure_ascii=False))


ENCODING_HELP = "Encoding of a CSV export (utf-8, cp1251, utf-16, ...); default: detected"
DELIMITER_HELP = "Delimiter of a CSV export (',', ';', tab); default: detected"
SHEET_HELP = "Sheet of an XLSX export; default: the first"


def _export_format(path: Path, encoding: Optional[str], delimiter: Optional[str], sheet: Optional[str]):
    """The export's format from the options and detection, echoed to stderr (one error line if unreadable)."""
    from smsflow.exports import ExportError, delimiter_option, encoding_option, sniff

    try:
        fmt = sniff(path, encoding=encoding_option(encoding), delimiter=delimiter_option(delimiter), sheet=sheet)
    except ExportError as exc:
        _fail(str(exc))
    typer.echo(f"reading {path.name}: {fmt.describe()}", err=True)
    return fmt


@app.command("validate")
def validate_cmd(
    in_path: Path = typer.Argument(..., help="Input export: CSV (any usual encoding/delimiter) or XLSX"),
    out: Path = typer.Option(..., "--out", help="Output CSV (UTF-8, comma-separated)"),
    default_region: str = typer.Option("RU", "--default-region"),
    phone_column: str = typer.Option("phone", "--phone-column"),
    encoding: Optional[str] = typer.Option(None, "--encoding", help=ENCODING_HELP),
    delimiter: Optional[str] = typer.Option(None, "--delimiter", help=DELIMITER_HELP),
    sheet: Optional[str] = typer.Option(None, "--sheet", help=SHEET_HELP),
) -> None:
    """Normalize phones to E.164 and mark bad rows and duplicates; every input row is kept in order."""
    from tasks.validate_csv import ValidationInputError, validate_csv

    if not in_path.exists():
        _fail(f"input file not found: {in_path}")
    fmt = _export_format(in_path, encoding, delimiter, sheet)
    try:
        counts = validate_csv(in_path, out, default_region=default_region, phone_column=phone_column, fmt=fmt)
    except (ValidationInputError, FileNotFoundError) as exc:
        _fail(str(exc))
    typer.echo(json.dumps(counts, ensure_ascii=False), err=True)


def _slug(text: str) -> str:
    """For Block names (Prefect allows lowercase ASCII letters, digits and dashes)."""
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:40] or "x"


def _name_part(text: str) -> str:
    """For campaign names: letters of any script kept (``выгрузка-promo``)."""
    return re.sub(r"[\W_]+", "-", text.lower()).strip("-")[:40] or "x"


def _quiet_prefect_to_stderr() -> None:
    """Prefect's console logs must not mix with the JSON on stdout; our steps' progress goes to stderr."""
    from smsflow import progress

    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    progress.show_on_stderr()


def _save_gateway_if_missing(name: str) -> None:
    from blocks.gateway import SandboxGateway
    from blocks.registry import load_gateway

    try:
        load_gateway(name)
    except ValueError:
        if name != "sandbox":
            _fail(f"no gateway block named '{name}'")
        SandboxGateway().save(name, overwrite=True)


@app.command("campaign")
def campaign_cmd(
    source_csv: Path = typer.Option(..., "--source-csv", "--source",
                                    help="CRM export (CSV in any usual encoding/delimiter, XLSX or Parquet) with id, phone, ... columns"),
    template: Path = typer.Option(..., "--template", help="Jinja2 template file or YAML template with language variants"),
    dry_run: bool = typer.Option(False, "--dry-run", help="Plan and price into the outbox, send nothing"),
    name: Optional[str] = typer.Option(None, "--name", help="Campaign name (rerun the same name to resume)"),
    gateway_block: str = typer.Option("sandbox", "--gateway-block", help="SMS gateway Block name"),
    segment: str = typer.Option("all", "--segment"),
    segments_file: Optional[Path] = typer.Option(None, "--segments-file"),
    rate: Optional[float] = typer.Option(None, "--rate", help="Messages per second"),
    wait: float = typer.Option(30.0, "--wait", help="Seconds to wait for final receipts"),
    now: Optional[str] = typer.Option(None, "--now", help="ISO-8601 clock for the send plan (default: now)"),
    plan_out: Optional[Path] = typer.Option(None, "--plan-out", help="With --dry-run: the send plan as CSV"),
    quarantine_out: Optional[Path] = typer.Option(None, "--quarantine-out",
                                                  help="Write what was held back and why to this CSV (phones masked)"),
    policy_file: Optional[Path] = typer.Option(None, "--policy", help="YAML contact policy (windows, caps, consent)"),
    ends_at: Optional[str] = typer.Option(None, "--ends-at", help="ISO-8601: messages not sent by then expire"),
    encoding: Optional[str] = typer.Option(None, "--encoding", help=ENCODING_HELP),
    delimiter: Optional[str] = typer.Option(None, "--delimiter", help=DELIMITER_HELP),
    sheet: Optional[str] = typer.Option(None, "--sheet", help=SHEET_HELP),
    phone_column: Optional[str] = typer.Option(None, "--phone-column", help="The export's phone column (default: phone)"),
    columns: list[str] = typer.Option([], "--column", metavar="OURS=THEIRS",
                                      help="Map one of our columns to the export's, e.g. --column id=ID (repeatable)"),
    attribution_days: Optional[str] = typer.Option(None, "--attribution-days", metavar="DELIVERY[:CLICK]",
                                                   help="This campaign's attribution windows in days (default 7:7)"),
    ab_file: Optional[Path] = typer.Option(None, "--ab", help="YAML A/B/n test: variants, split, metric, holdout, "
                                           "test_share (smsflow/abtest.py); the rest waits for smsflow ab-decide"),
) -> None:
    """Run the campaign flow on a CRM export; prints one JSON object (the accounting) last."""
    if not source_csv.is_file():
        _fail(f"source export not found: {source_csv}")
    if not template.is_file():
        _fail(f"template not found: {template}")
    if dry_run and source_csv.stat().st_size <= WARM_MAX_BYTES:
        _warm_workers()
    _quiet_prefect_to_stderr()
    from tasks.policy import load_policy
    from smsflow.templates import TemplateError, load_template

    clock = _parse_time(now, "--now")
    end = _parse_time(ends_at, "--ends-at")
    policy = None
    if policy_file:
        import yaml

        try:
            policy = load_policy(yaml.safe_load(policy_file.read_text(encoding="utf-8")) or {})
        except (OSError, ValueError) as exc:
            _fail(f"policy {policy_file}: {exc}")

    try:
        load_template(template)
    except TemplateError as exc:
        _fail(f"template {template}: {exc}")
    ab = _load_ab(ab_file) if ab_file else None
    windows = _attribution_days(attribution_days)
    column_map = _column_map(columns, phone_column)
    fmt = _export_format(source_csv, encoding, delimiter, sheet)
    source = _export_source(source_csv, fmt, column_map)
    _check_export(source)
    name = name or f"{_name_part(source_csv.stem)}-{_name_part(template.stem)}"
    typer.echo(f"campaign: {name} (rerun with --name {name} to resume it)", err=True)
    if dry_run and ab is None:  # a preview: in this process, no Prefect runs (tasks/dry_run.py says what it records)
        result = _dry_run(source, template, name, gateway_block, segment, segments_file, policy, end)
        _campaign_result(name, result, clock, plan_out, quarantine_out)
        if _STATE.get("console"):
            _STATE["fast_exit"] = True  # the console entry point ends the process once the command returned
        else:
            from smsflow import warm

            warm.stop()
        return
    with _prefect_session():
        _campaign(source, template, name, gateway_block, segment, segments_file, rate, dry_run, wait, policy, end,
                  clock, plan_out, quarantine_out, ab, windows)


def _attribution_days(value: Optional[str]) -> tuple[Optional[float], Optional[float]]:
    if not value:
        return None, None
    try:
        parts = [float(x) for x in value.split(":")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or any(not 0 < x <= 365 for x in parts):
        _fail(f"--attribution-days {value!r}: DELIVERY[:CLICK] in days, each > 0 and <= 365, e.g. 3 or 3:1")
    return parts[0], parts[-1]


def _load_ab(path: Path):
    """The A/B design of --ab, checked at once (variant templates too)."""
    import yaml
    from pydantic import ValidationError

    from smsflow.abtest import ABTest
    from smsflow.templates import TemplateError, load_template

    if not path.is_file():
        _fail(f"A/B design not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for v in raw.get("variants") or []:  # variant templates relative to the design file
            if isinstance(v, dict) and v.get("template") and (path.parent / v["template"]).is_file():
                v["template"] = str((path.parent / v["template"]).resolve())
        ab = ABTest.model_validate(raw)
    except (OSError, ValueError, AttributeError, ValidationError) as exc:
        _fail(f"A/B design {path}: {exc}")
    for v in ab.variants:
        if v.template:
            try:
                load_template(v.template)
            except TemplateError as exc:
                _fail(f"A/B design {path}: variant {v.name}: {exc}")
    return ab


WARM_MAX_BYTES = 16 << 20  # about 150,000 rows: bigger exports are read and checked in a reader process anyway


def _warm_workers() -> None:
    """Start the extract checks' worker now, importing Great Expectations while this process imports the rest
    (smsflow.warm): a small preview no longer waits for both imports one after the other."""
    from smsflow import warm
    from smsflow.settings import get_settings

    warm.start("tasks.expectations:warm_up", workers=get_settings().workers)


def _exit_now(code: int = 0) -> None:
    """End a preview without the interpreter's teardown (~0.9 s for a 1,000-contact preview: the checks worker
    joined, then pandas, SQLAlchemy, Prefect and their modules freed one by one). Safe here: everything it
    wrote is committed, no Prefect API or run was involved; output streams and logs are flushed first, and the
    store's connections closed (SQLite checkpoints its WAL on the last close)."""
    import logging

    from smsflow import warm
    from store.db import dispose_engines

    warm.stop(kill=True)
    dispose_engines()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _dry_run(source, template, name, gateway_block, segment, segments_file, policy, end) -> dict:
    from smsflow.settings import DEFAULT_CURRENCY, DEFAULT_SENDER_ID, SANDBOX_PRICE_PER_SEGMENT
    from store.db import get_engine
    from tasks.dry_run import dry_run_campaign
    from tasks.policy import ContactPolicy

    # the built-in sandbox's price: no Prefect to import or start for it
    price, sender, currency = SANDBOX_PRICE_PER_SEGMENT, DEFAULT_SENDER_ID, DEFAULT_CURRENCY
    if gateway_block != "sandbox" or os.environ.get("PREFECT_API_URL"):
        from blocks.registry import load_gateway  # its price, currency and sender live in Prefect's block store

        with _prefect_session():
            try:
                gw = load_gateway(gateway_block)
                price, sender, currency = gw.price_per_segment, gw.sender_id, getattr(gw, "currency", DEFAULT_CURRENCY)
            except ValueError:
                if gateway_block != "sandbox":
                    _fail(f"no gateway block named '{gateway_block}'")
    try:
        return dry_run_campaign(get_engine(), source, name=name, template=str(template.resolve()), segment=segment,
                                segments_file=str(segments_file.resolve()) if segments_file else None,
                                gateway_name=gateway_block, price_per_segment=price, sender_name=sender,
                                currency=currency, policy=policy if policy is not None else ContactPolicy(),
                                ends_at=end)
    except Exception as exc:  # noqa: BLE001 - one clear line (SMSFLOW_TRACEBACKS=1 shows the traceback)
        if os.environ.get("SMSFLOW_TRACEBACKS"):
            raise
        _fail(f"campaign failed: {type(exc).__name__}: {exc}", 1)
        raise


def _column_map(columns: list[str], phone_column: Optional[str]) -> dict[str, str]:
    from smsflow.exports import CONTACT_COLUMNS

    out: dict[str, str] = {}
    for item in columns:
        ours, sep, theirs = item.partition("=")
        if not sep or not ours.strip() or not theirs.strip():
            _fail(f"--column {item!r}: use OURS=THEIRS, e.g. --column phone=Телефон")
        if ours.strip() not in CONTACT_COLUMNS:
            _fail(f"--column {item!r}: {ours.strip()!r} is not one of our columns: {', '.join(CONTACT_COLUMNS)}")
        out[ours.strip()] = theirs.strip()
    if phone_column:
        out["phone"] = phone_column
    return out


def _export_source(path: Path, fmt, column_map: dict[str, str]):
    """The CLI export as a CRM source (plain: a preview reads it without Prefect; a Prefect run saves it as a
    CsvCrm Block, ``_campaign``); its name (the contacts' source key) is stable per file path."""
    from smsflow.exports import ExportSource

    path = path.resolve()
    return ExportSource(path=str(path), source_name=_export_source_name(path), column_map=column_map,
                        encoding=fmt.encoding, delimiter=fmt.delimiter, sheet=fmt.sheet)


def _export_source_name(path: Path) -> str:
    path = path.resolve()
    return f"csv-{_slug(path.stem)}-{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"


def _check_export(source) -> None:
    """Bad input fails here, at once and in one line, before any Prefect run starts (a run would
    only fail later with the same error)."""
    from smsflow.exports import CrmSourceError, missing_columns_hint
    from tasks.extract import REQUIRED_COLUMNS

    try:
        head = source.read_all(nrows=5)
    except CrmSourceError as exc:
        _fail(str(exc))
    missing = [c for c in REQUIRED_COLUMNS if c not in head.columns]
    if missing:
        cols = [str(c) for c in head.columns]
        theirs = [source.column_map.get(c, c) for c in missing]
        hint = missing_columns_hint(cols) or (
            " (map a column named differently with --phone-column or --column OURS=THEIRS)")
        _fail(f"{source.path}: required column(s) {', '.join(theirs)} not found; columns: {', '.join(cols)}{hint}")


def _campaign(source, template, name, gateway_block, segment, segments_file, rate, dry_run, wait, policy, end, clock,
              plan_out, quarantine_out, ab=None, windows=(None, None)) -> None:
    # One Block per CLI run, removed afterwards (the UI keeps no csv-* Blocks); the name, the
    # contacts' source key, is the same on every run over the same file.
    from blocks.crm import CsvCrm

    block_name = source.source_name
    source = CsvCrm(path=source.path, source_name=block_name, column_map=source.column_map, encoding=source.encoding,
                    delimiter=source.delimiter, sheet=source.sheet)
    source.save(block_name, overwrite=True)
    try:
        _save_gateway_if_missing(gateway_block)
        result = _run_campaign(source, block_name, template, name, gateway_block, segment, segments_file, rate, dry_run,
                               wait, policy, end, clock, ab, windows)
    finally:
        _delete_block("csv-crm", block_name)
    _campaign_result(name, result, clock, plan_out, quarantine_out)


def _campaign_result(name: str, result: dict, clock, plan_out: Optional[Path], quarantine_out: Optional[Path]) -> None:
    """What the person at the terminal sees (stderr) and the accounting JSON (stdout) of a campaign run."""
    from tasks.policy import preview_plan, write_plan_csv

    if result.get("report"):
        typer.echo(f"report: {result['report']}", err=True)
    if plan_out:
        from datetime import datetime, timezone

        from store.db import get_engine

        rows = preview_plan(get_engine(), result["campaign_id"], clock or datetime.now(timezone.utc))
        write_plan_csv(rows, plan_out)
        typer.echo(f"plan: {len(rows)} rows -> {plan_out}", err=True)
    held = _held_back(name, quarantine_out)
    for line in _summary_lines(name, result["summary"]):
        typer.echo(line, err=True)
    if result.get("ab"):
        a = result["ab"]
        typer.echo(f"A/B: arms {a['arms']}, holdout {a['holdout']}, waiting for the winner {a['rollout']}; "
                   f"{a['per_arm_needed']} per arm needed", err=True)
        if "warning" in a:
            typer.echo(f"warning: {a['warning']}", err=True)
        result["summary"]["ab"] = a
    typer.echo(json.dumps(result["summary"], ensure_ascii=False))
    render_failed = sum(g["count"] for g in held if g["step"] == "render")
    if render_failed and not result["summary"].get("planned"):
        _fail(f"no message could be rendered ({render_failed} failed): fix the template and rerun with --name {name}", 1)


def _held_back(campaign: str, out: Optional[Path]) -> list[dict]:
    """Print what a campaign held back (counts per reason, one masked example each); optionally a CSV."""
    from store.db import get_engine
    from store import quarantine

    engine = get_engine()
    groups = quarantine.summary(engine, campaign=campaign)
    if groups:
        typer.echo(f"held back: {sum(g['count'] for g in groups)} rows "
                   f"(all of them: smsflow quarantine --campaign {campaign})", err=True)
        for line in quarantine.summary_lines(groups):
            typer.echo(line, err=True)
    if out:
        n = quarantine.write_csv(quarantine.held_back(engine, campaign=campaign), out)
        typer.echo(f"quarantine: {n} rows -> {out}", err=True)
    return groups


def _delete_block(block_type: str, name: str) -> None:
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            client.delete_block_document(client.read_block_document_by_name(name, block_type).id)
    except Exception:  # noqa: BLE001 - cleanup only; the Block is overwritten by the next run anyway
        pass


def _run_campaign(source, block_name, template, name, gateway_block, segment, segments_file, rate, dry_run, wait, policy,
                  end, clock, ab=None, windows=(None, None)) -> dict:
    from flows.campaign import CampaignParams, campaign

    params = CampaignParams(
        name=name,
        source_block=block_name,
        template=str(template.resolve()),
        segment=segment,
        segments_file=str(segments_file.resolve()) if segments_file else None,
        gateway_block=gateway_block,
        rate=rate,
        dry_run=dry_run,
        wait_for_receipts_s=wait,
        **({"policy": policy} if policy is not None else {}),
        ends_at=end,
        now=clock,
        ab=ab,
        attribution_delivery_days=windows[0],
        attribution_click_days=windows[1],
    )
    try:
        return campaign(params)
    except Exception as exc:  # noqa: BLE001 - one clear line, the traceback is in the Prefect logs
        _fail(f"campaign failed: {type(exc).__name__}: {exc}", 1)
        raise


def _parse_time(value: Optional[str], option: str):
    if not value:
        return None
    from datetime import datetime, timezone

    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        _fail(f"{option}: not an ISO-8601 time: {value!r}")
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


@app.command("demo")
def demo_cmd(
    contacts: int = typer.Option(2000, "--contacts", min=10, max=1_000_000, help="Demo CRM size"),
    seed: int = typer.Option(42, "--seed"),
    wait: float = typer.Option(20.0, "--wait", help="Seconds to wait for final receipts"),
    ab: bool = typer.Option(False, "--ab", help="An A/B test with a 10 % holdout: two texts on 50 % of the rest, "
                            "a day later the winner to the others"),
) -> None:
    """Generate the demo CRM, run the campaign end to end on the embedded defaults, print a summary."""
    _quiet_prefect_to_stderr()
    from datetime import datetime

    name = f"demo-{datetime.now():%Y%m%d-%H%M%S}"
    # the demo's links point at a placeholder domain unless an operator's base URL is set
    os.environ.setdefault("SMSFLOW_LINK_BASE_URL", DEMO_LINK_BASE)
    from smsflow.settings import reset_settings

    reset_settings()
    if ab:
        name = name.replace("demo-", "demo-ab-", 1)
    with _prefect_session():
        result = _demo_run(name, contacts, seed, wait, ab)
        after = _demo_after(result["campaign_id"], seed, name if ab else None, wait)
    for line in _summary_lines(name, result["summary"]):
        typer.echo(line)
    if ab:
        a = result["ab"]
        typer.echo(f"A/B test: {a['arms']} tested, {a['holdout']} held out, {a['rollout']} waited for the winner")
        typer.echo(f"decision a day later: {after['decision']['verdict']}; roll-out: "
                   f"{after['decision'].get('rollout', {}).get('planned', 0)} messages")
    typer.echo(f"after sending (simulated): {after['clicks']} requests to the links, {after['orders']} new orders, "
               f"{after['replies']} replies")
    for line in _earnings_lines(name):
        typer.echo(line)
    if ab:
        from store.db import get_engine
        from tasks.metrics import campaign_metrics
        from tasks.report_page import ab_summary

        for line in ab_summary(campaign_metrics(get_engine(), name)):
            typer.echo(f"A/B {line.strip()}")
    typer.echo(f"report: {after['report']}")


DEMO_LINK_BASE = "https://s.smsflow.example"


def _demo_ab():
    from smsflow.abtest import ABTest, Variant
    from smsflow.settings import PROJECT_ROOT

    return ABTest(variants=[Variant(name="A"), Variant(name="B", template=str(PROJECT_ROOT / "templates" /
                                                                               "demo_promo_link_b.yaml"))],
                  metric="click_rate", holdout=0.1, test_share=0.5, mde=0.05, baseline=0.1, deadline_hours=20,
                  fallback="control")


DEMO_CLICKS = {"A": 0.10, "B": 0.20}  # the simulated people like B's text better


def _demo_after(campaign_id: int, seed: int, ab_name: str | None = None, wait: float = 0.0) -> dict:
    """Clicks, previews, replies and orders after the demo campaign (tasks/demo_outcomes.py), then the
    orders read back from the demo CRM as any CRM's are. An A/B demo: after the test share, a wake-up a
    day later decides and rolls the winner out, whose messages get their outcomes too."""
    from blocks.registry import load_crm
    from smsflow.settings import get_settings
    from store.db import get_engine
    from tasks.demo_outcomes import simulate
    from tasks.orders import extract_orders

    from sqlalchemy import text

    from tasks.report import collect
    from tasks.report_page import write_html

    engine = get_engine()
    crm = get_settings().data_dir / "demo_crm.sqlite"
    if ab_name is None:
        after = simulate(engine, campaign_id, crm, seed=seed)
    else:
        from flows.abtest import ab_decide

        after = simulate(engine, campaign_id, crm, seed=seed, click_share_by_variant=DEMO_CLICKS, step="ab-test")
        extract_orders(engine, load_crm("demo-crm"))
        decision = ab_decide(ab_name, _demo_noon(), wait)[ab_name]
        more = simulate(engine, campaign_id, crm, seed=seed + 1, click_share_by_variant=DEMO_CLICKS, step="ab-rollout")
        after = {k: after[k] + more[k] for k in after}
        after["decision"] = decision
    extract_orders(engine, load_crm("demo-crm"))
    # the page again, now with what happened after sending
    with engine.connect() as conn:
        name = conn.execute(text("SELECT name FROM campaigns WHERE id = :c"), {"c": campaign_id}).scalar_one()
    after["report"] = str(write_html(collect(engine, name), get_settings().reports_dir, f"report-{name}", engine))
    return after


def _earnings_lines(name: str) -> list[str]:
    from store.db import get_engine
    from tasks.metrics import campaign_metrics

    return [f"earned: {_earned(r)}" for r in campaign_metrics(get_engine(), name)]


def _summary_lines(name: str, s: dict) -> list[str]:
    """The contact funnel, then (after a send) where every planned message ended and what it cost."""
    from tasks.outcomes import money, outcome_line

    funnel = (f"campaign {name}: {s['contacts']} CRM rows -> {s['planned']} planned, {s['quarantined']} quarantined, "
              f"{s['duplicates']} duplicates, {s['no_consent']} without consent"
              + (f", {s['not_in_segment']} not in the segment" if s.get("not_in_segment") else ""))
    lines = [funnel]
    if "outcomes" in s:
        lines.append(f"messages: {outcome_line(s, s['currency'])} (planned {money(s['cost_planned'], s['currency'])})")
    else:
        lines.append(f"messages: {s['planned']} planned, {s['parts']} parts, planned cost "
                     f"{money(s['cost_planned'], s['currency'])}")
    return lines


DEMO_ORDERS = ("SELECT id AS order_id, contact_id, amount, status, created_at AS ordered_at, created_at AS updated_at "
               "FROM orders")


def _demo_run(name: str, contacts: int, seed: int, wait: float, ab: bool = False) -> dict:
    from blocks.crm import SqlCrm
    from blocks.gateway import SandboxGateway
    from flows.campaign import CampaignParams, campaign
    from smsflow.demo_crm import write_crm_sqlite
    from datetime import timedelta

    from smsflow.settings import PROJECT_ROOT, get_settings

    crm_path = get_settings().data_dir / "demo_crm.sqlite"
    typer.echo(f"generating a demo CRM with {contacts} contacts -> {crm_path}", err=True)
    write_crm_sqlite(crm_path, contacts, seed=seed)
    SqlCrm(url=f"sqlite:///{crm_path.resolve()}", source_name="demo-crm", orders_query=DEMO_ORDERS).save(
        "demo-crm", overwrite=True)
    SandboxGateway(min_delay_s=0.1, max_delay_s=2.0).save("sandbox", overwrite=True)
    return campaign(CampaignParams(
        name=name,
        source_block="demo-crm",
        template=str(PROJECT_ROOT / "templates" / "demo_promo_link.yaml"),
        segment="all",
        gateway_block="sandbox",
        wait_for_receipts_s=wait,
        full_refresh=True,
        now=_demo_noon() - timedelta(days=1) if ab else _demo_noon(),
        ab=_demo_ab() if ab else None,
    ))


def _demo_noon():
    """The demo sends as if it were the last noon in Moscow (inside the marketing window whatever the hour,
    so the story has deliveries to click on; the policy still holds back people in time zones where it was
    night then). Never in the future: the send times stored are this clock's."""
    from datetime import datetime, time, timedelta
    from zoneinfo import ZoneInfo

    msk = ZoneInfo("Europe/Moscow")
    now = datetime.now(msk)
    noon = datetime.combine(now.date(), time(12, 0), tzinfo=msk)
    return noon if noon <= now else noon - timedelta(days=1)


gateway_app = typer.Typer(no_args_is_help=True, help="SMS gateway Blocks.")
app.add_typer(gateway_app, name="gateway")


@gateway_app.command("save")
def gateway_save_cmd(
    name: str = typer.Argument(..., help="Block name (lowercase letters, digits, dashes)"),
    kind: str = typer.Option(..., "--kind", help="kannel | smpp | http | sandbox"),
    url: Optional[str] = typer.Option(None, "--url", help="kannel: sendsms URL; http: API base URL"),
    host: Optional[str] = typer.Option(None, "--host", help="smpp: SMSC host"),
    port: Optional[int] = typer.Option(None, "--port", help="smpp: SMSC port"),
    username: Optional[str] = typer.Option(None, "--username", help="kannel user / smpp system_id / http account SID"),
    password: Optional[str] = typer.Option(None, "--password", help="stored as a secret; prefer SMSFLOW_GATEWAY_PASSWORD"),
    dlr_url: Optional[str] = typer.Option(None, "--dlr-url", help="our callback URL for receipts"),
    rate: Optional[float] = typer.Option(None, "--rate", help="messages per second"),
    evidence_grace: Optional[float] = typer.Option(
        None, "--evidence-grace", help="seconds a message left in flight by a crash waits for a late receipt"),
) -> None:
    """Save a gateway Block (credentials go into Secret fields, never into logs)."""
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", name):
        _fail("block names use lowercase letters, digits and dashes")
    password = password or os.environ.get("SMSFLOW_GATEWAY_PASSWORD")
    common = {k: v for k, v in {"rate_per_second": rate, "evidence_grace_s": evidence_grace}.items() if v is not None}
    try:
        if kind == "sandbox":
            from blocks.gateway import SandboxGateway

            block = SandboxGateway(**common)
        elif kind == "http":
            from blocks.http_gateway import HttpGateway

            block = HttpGateway(**common, **{k: v for k, v in {"base_url": url, "account_sid": username,
                                                                   "auth_token": password, "status_callback_url": dlr_url}.items() if v})
        elif kind == "kannel":
            from blocks.kannel import KannelGateway

            block = KannelGateway(**common, **{k: v for k, v in {"sendsms_url": url, "username": username,
                                                                     "password": password, "dlr_url": dlr_url}.items() if v})
        elif kind == "smpp":
            from blocks.smpp import SmppGateway

            block = SmppGateway(**common, **{k: v for k, v in {"host": host, "port": port, "system_id": username,
                                                                   "password": password}.items() if v})
        else:
            _fail(f"unknown --kind {kind!r}: use kannel, smpp, http or sandbox")
            return
    except ImportError as exc:
        _fail(f"gateway kind {kind!r} is not available: {exc}")
        return
    except ValueError as exc:
        _fail(f"invalid gateway settings: {exc}")
        return
    with _prefect_session():
        block.save(name, overwrite=True)
    typer.echo(json.dumps({"saved": name, "kind": kind, "type": type(block).get_block_type_slug()}))


@app.command("forget")
def forget_cmd(
    who: str = typer.Argument(..., help="Phone number (any format) or CRM id"),
    default_region: str = typer.Option("RU", "--default-region"),
) -> None:
    """Erase a person everywhere (outbox texts included); only a salted hash stays, on the suppression list."""
    from store.db import get_engine
    from tasks.erasure import forget

    try:
        res = forget(get_engine(), who, default_region)
    except ValueError as exc:
        _fail(str(exc))
    typer.echo(json.dumps(res.as_dict()))


@app.command("report")
def report_cmd(
    campaign: Optional[str] = typer.Option(None, "--campaign", help="Only this campaign"),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line, one per campaign"),
) -> None:
    """What each campaign did and earned: sent, delivered, clicks, replies, opt-outs, conversions, revenue,
    cost, ROI (tasks/metrics.py defines every number)."""
    from store.db import get_engine
    from tasks.metrics import campaign_metrics

    engine = get_engine()
    if campaign is not None:
        from tasks.accounting import campaign_id

        if campaign_id(engine, campaign) is None:
            _fail(f"no campaign named {campaign!r}")
    rows = campaign_metrics(engine, campaign)
    if as_json:
        for r in rows:
            typer.echo(json.dumps(r, ensure_ascii=False))
        return
    if not rows:
        typer.echo("no campaigns yet")
        return
    from tasks.report_page import ab_summary

    for r in rows:
        typer.echo(f"{r['campaign']}: {_earned(r)}")
        for line in ab_summary([r]):
            typer.echo(f"  A/B {line.strip()}")


def _earned(r: dict) -> str:
    """One campaign's tasks/metrics.py row as people read it (`smsflow report`, the demo's summary)."""
    cur = r["currency"]
    roi = "n/a" if r["roi"] is None else f"{r['roi'] * 100:.1f} %"
    return (f"{r['sent']} sent, {r['delivered']} delivered, {r['failed']} failed; {r['clicks_human']} clicks by "
            f"people ({r['clicks_total']} requests incl. link previews, {r['unique_clickers']} people), "
            f"{r['replies']} replies, {r['opt_outs']} opt-outs; {r['conversions']} conversions, revenue "
            f"{r['revenue']:,.2f} {cur}, cost {r['cost']:,.2f} {cur}, ROI {roi}")


@app.command("orders")
def orders_cmd(
    source_csv: Path = typer.Option(..., "--source-csv", "--source", help="The contacts export campaigns were run on"),
    orders: Path = typer.Option(..., "--orders", help="Orders/deals export: order_id, contact_id, amount, status, "
                                "ordered_at[, updated_at, currency] (CSV in any usual encoding, XLSX, Parquet)"),
) -> None:
    """Read an orders/deals export for conversions and revenue (tasks/orders.py); prints one JSON object."""
    from blocks.crm import CrmSourceError
    from store.db import get_engine
    from tasks.orders import extract_orders

    for path in (source_csv, orders):
        if not path.is_file():
            _fail(f"file not found: {path}")
    # the same source key as `campaign` gives this contacts export, so orders find their contacts
    from blocks.crm import CsvCrm

    source = CsvCrm(path=str(source_csv.resolve()), source_name=_export_source_name(source_csv),
                    orders_path=str(orders.resolve()))
    try:
        res = extract_orders(get_engine(), source)
    except CrmSourceError as exc:
        _fail(str(exc))
    typer.echo(json.dumps({"rows": res.rows, "stored": res.stored, "quarantined": res.quarantined}))


@app.command("ab-decide")
def ab_decide_cmd(
    campaign: Optional[str] = typer.Option(None, "--campaign", help="Only this campaign's test"),
    now: Optional[str] = typer.Option(None, "--now", help="ISO-8601 clock (default: now)"),
    wait: float = typer.Option(0.0, "--wait", help="Seconds to wait for receipts of the roll-out"),
    rate: Optional[float] = typer.Option(None, "--rate", help="Messages per second of the roll-out"),
) -> None:
    """Look at open A/B tests: log the look, decide once (sequential test or deadline), send the rest the
    winner. Prints one JSON object per campaign line: phase, winner, verdict."""
    from store.db import get_engine

    if campaign is not None:
        from tasks.accounting import campaign_id

        if campaign_id(get_engine(), campaign) is None:
            _fail(f"no campaign named {campaign!r}")
    clock = _parse_time(now, "--now")
    _quiet_prefect_to_stderr()
    with _prefect_session():
        from flows.abtest import ab_decide

        try:
            out = ab_decide(campaign, clock, wait, rate)
        except Exception as exc:  # noqa: BLE001 - one clear line, the traceback is in the Prefect logs
            _fail(f"ab-decide failed: {type(exc).__name__}: {exc}", 1)
            raise
    for name, entry in out.items():
        typer.echo(json.dumps({"campaign": name, **{k: v for k, v in entry.items() if k != "send"}},
                              ensure_ascii=False, default=str))


@app.command("ab-stats")
def ab_stats_cmd(
    variant: list[str] = typer.Option(..., "--variant", help="NAME=SENT:CONVERSIONS, once per variant"),
    control: Optional[str] = typer.Option(None, "--control", help="The control variant (default: the first)"),
    alpha: float = typer.Option(0.05, "--alpha", help="Significance level (Holm over the non-control variants)"),
    split: Optional[str] = typer.Option(None, "--split", help="Configured split NAME=SHARE,... (default: equal)"),
) -> None:
    """Fixed-horizon A/B/n statistics of given counts, as one JSON object (smsflow/abtest.py says how)."""
    from smsflow.abtest import ABError, ab_stats, parse_split

    counts = []
    for v in variant:
        name, sep, rest = v.partition("=")
        sent, sep2, conv = rest.partition(":")
        if not sep or not sep2 or not name.strip() or not re.fullmatch(r"-?\d+", sent.strip() or "x") \
                or not re.fullmatch(r"-?\d+", conv.strip() or "x"):
            _fail(f"--variant {v!r}: expected NAME=SENT:CONVERSIONS with whole numbers")
        counts.append((name.strip(), int(sent), int(conv)))
    try:
        shares = parse_split(split, [c[0] for c in counts]) if split else None
        out = ab_stats(counts, control=control, alpha=alpha, split=shares)
    except ABError as exc:
        _fail(str(exc))
    typer.echo(json.dumps(out))


@app.command("ab-size")
def ab_size_cmd(
    baseline: float = typer.Option(..., "--baseline", help="The control's expected rate, e.g. 0.05"),
    mde: float = typer.Option(..., "--mde", help="Minimum detectable effect, absolute, e.g. 0.01 (1 pp)"),
    alpha: float = typer.Option(0.05, "--alpha"),
    power: float = typer.Option(0.8, "--power"),
) -> None:
    """Contacts per arm for a two-sided test of baseline -> baseline + mde, as {"per_arm": N}."""
    from smsflow.abtest import ABError, ab_size

    try:
        typer.echo(json.dumps({"per_arm": ab_size(baseline, mde, alpha, power)}))
    except ABError as exc:
        _fail(str(exc))


@app.command("archive")
def archive_cmd(
    campaign: str = typer.Option(..., "--campaign", help="The finished campaign to archive"),
    batch: int = typer.Option(10_000, "--batch", min=100, help="Messages removed per transaction"),
    older_than_days: float = typer.Option(30.0, "--older-than-days", min=0,
                                          help="Refuse campaigns with messages changed more recently (caps count them)"),
) -> None:
    """Move a finished campaign's messages out of the live outbox in short transactions; its funnel and
    outcomes stay on the campaign (prints one JSON object). The campaign cannot be rerun afterwards."""
    from store.db import get_engine
    from tasks.archive import ArchiveRefused, archive_campaign

    try:
        res = archive_campaign(get_engine(), campaign, batch=batch, older_than_days=older_than_days)
    except ArchiveRefused as exc:
        _fail(str(exc))
    typer.echo(f"archived {campaign}: {res.messages} messages, {res.receipts} receipts, {res.quarantine} quarantine rows "
               f"in {res.batches} transactions; {res.parked_receipts} parked receipts past the retention", err=True)
    typer.echo(json.dumps(res.as_dict(), ensure_ascii=False, default=str))


@app.command("quarantine")
def quarantine_cmd(
    campaign: Optional[str] = typer.Option(None, "--campaign", help="Only this campaign (its source's rows and its own)"),
    step: Optional[str] = typer.Option(None, "--step", help="extract | validate | render"),
    limit: int = typer.Option(50, "--limit", min=0, help="Rows listed after the summary (0: none)"),
    out: Optional[Path] = typer.Option(None, "--out", help="Write every row to this CSV instead of listing them"),
) -> None:
    """List what was held back and why: a summary per reason, then the rows (phones masked)."""
    from store.db import get_engine
    from store import quarantine

    engine = get_engine()
    try:
        groups = quarantine.summary(engine, campaign=campaign, step=step)
    except (quarantine.UnknownCampaign, ValueError) as exc:
        _fail(str(exc))
    total = sum(g["count"] for g in groups)
    typer.echo(f"held back: {total} rows" + (f" in campaign {campaign}" if campaign else "") +
               (f", step {step}" if step else ""))
    for line in quarantine.summary_lines(groups):
        typer.echo(line)
    if out:
        n = quarantine.write_csv(quarantine.held_back(engine, campaign=campaign, step=step), out)
        typer.echo(f"{n} rows -> {out}")
    elif limit and total:
        typer.echo("")
        typer.echo("step\treason_code\tcrm_id\tphone\treason")
        for r in quarantine.held_back(engine, campaign=campaign, step=step, limit=limit):
            typer.echo(f"{r.step}\t{r.reason_code}\t{r.crm_id}\t{r.phone}\t{r.reason}")
        if total > limit:
            typer.echo(f"... {total - limit} more (--limit, or --out FILE for all)")


journey_app = typer.Typer(no_args_is_help=True, help="Triggered journeys (journeys/*.yaml).")
app.add_typer(journey_app, name="journey")


@journey_app.command("check")
def journey_check(directory: Path = typer.Argument(None, help="Default: SMSFLOW_JOURNEYS_DIR or <project>/journeys")) -> None:
    """Validate every journey file (triggers, steps, conditions, templates); exit 1 on the first error."""
    from smsflow.settings import get_settings
    from tasks.journey_defs import JourneyError, load_journeys

    try:
        journeys = load_journeys(directory or get_settings().journeys_dir)
    except JourneyError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    for j in journeys:
        steps = ", ".join(f"{s.name}" + (f" after {s.wait_for.event}" if s.wait_for else "") +
                          (f" +{s.delay}" if s.delay else "") for s in j.steps)
        typer.echo(f"{j.name}: trigger {j.trigger.kind} ({j.trigger.event or j.trigger.date_field or j.trigger.inactive_days}); "
                   f"steps: {steps}")


@journey_app.command("run")
def journey_run(
    directory: Path = typer.Option(None, "--dir", help="Journeys directory (default: SMSFLOW_JOURNEYS_DIR)"),
    gateway_block: str = typer.Option("sandbox", "--gateway-block"),
) -> None:
    """Run the journey flow once: new CRM events, date/inactivity triggers, due steps, sends."""
    with _prefect_session():
        from flows.journey import journey

        result = journey(journeys_dir=str(directory) if directory else None, gateway_block=gateway_block)
    typer.echo(json.dumps(result, ensure_ascii=False, indent=1, default=str))


@app.command("serve")
def serve_cmd(
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8787, "--port"),
) -> None:
    """Start the callback/inbound service and the short-link redirect (receipts, replies and clicks are
    stored before the answer). Prefect events are emitted to the server of PREFECT_API_URL; without one
    nothing would receive them, so none are emitted and no temporary Prefect API is started."""
    from prefect.settings import get_current_settings

    from service.app import run

    if not get_current_settings().api.url:
        typer.echo("no PREFECT_API_URL: serving without Prefect events (the store has everything)", err=True)
        run(host=host, port=port, emit_events=False)
        return
    with _prefect_session():
        run(host=host, port=port)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
