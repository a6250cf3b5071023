"""smsflow.lazy_imports: a deferred module's code runs at its first attribute access, not at its import."""
from __future__ import annotations

import subprocess
import sys
import textwrap


def test_a_deferred_module_runs_at_first_use_and_only_then(tmp_path):
    pkg = tmp_path / "heavy"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("import os\nos.environ['HEAVY_RAN'] = '1'\nVALUE = 42\n")
    (pkg / "sub.py").write_text("import os\nos.environ['SUB_RAN'] = '1'\nNAME = 'sub'\n")
    (tmp_path / "eager.py").write_text("import os\nos.environ['EAGER_RAN'] = '1'\n")
    script = textwrap.dedent("""
        import json, os, sys
        from smsflow.lazy_imports import defer, deferred
        import eager                                # imported before: not deferred
        out = {"deferred_now": defer("heavy", "heavy.sub", "eager", "not_installed_anywhere")}
        import heavy
        import heavy.sub as sub_alias               # its parent's __path__ is read: heavy runs, sub stays deferred
        out["after_import"] = [os.environ.get(k) for k in ("HEAVY_RAN", "SUB_RAN")]
        out["deferred"] = [deferred("heavy"), deferred("heavy.sub"), deferred("eager")]
        out["value"] = sub_alias.NAME               # first use: runs it
        out["after_use"] = [os.environ.get(k) for k in ("HEAVY_RAN", "SUB_RAN")]
        out["deferred_after"] = deferred("heavy.sub")
        try:
            import not_installed_anywhere
        except ModuleNotFoundError as exc:
            out["missing"] = exc.name
        print(json.dumps(out))
    """)
    from smsflow.settings import PROJECT_ROOT

    r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                       env={"PYTHONPATH": f"{tmp_path}:{PROJECT_ROOT}", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    import json

    out = json.loads(r.stdout)
    assert out["deferred_now"] == ["heavy", "heavy.sub", "not_installed_anywhere"]
    assert out["after_import"] == ["1", None]
    assert out["deferred"] == [False, True, False]
    assert out["value"] == "sub" and out["after_use"] == ["1", "1"] and out["deferred_after"] is False
    assert out["missing"] == "not_installed_anywhere"
