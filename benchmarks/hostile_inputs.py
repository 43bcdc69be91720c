"""Bad inputs and faults thrown at the CLI, counted (issue 22, must-show 1).

Runs the listed cases of tests/security/test_hostile.py (corrupt saved memories, import rows of the
wrong type) and N hypothesis-generated examples of each fuzz family (edited snapshot manifests,
import rows, CLI option values) through the in-process CLI with the tests' tiny random Llama and a
fake embedder, and counts per kind: inputs tried, refused with one line, accepted, tracebacks. The
faults (full disk, kill -9) are counted by their own scripts and tests (see RESULTS.md).

python benchmarks/hostile_inputs.py --examples 200 --out benchmarks/results/hostile_inputs.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

from hypothesis import HealthCheck, given, settings

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def outcome(res) -> str:
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        return "traceback"
    if "Traceback" in res.output:
        return "traceback"
    if res.exit_code == 0:
        return "accepted"
    if res.exit_code == 2 and "Invalid value" in res.output or "No such option" in res.output:
        return "usage error"  # click's own: the option, the reason and --help, boxed
    errors = [line for line in res.stderr.split("\n") if line.startswith("error: ")]  # after progress lines
    return "one-line error" if len(errors) == 1 and res.stderr.endswith(errors[0] + "\n") else "other error output"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=200, help="generated examples per fuzz family")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="memllm-hostile-"))
    os.environ["MEMLLM_HOME"] = str(tmp / "home")
    from typer.testing import CliRunner

    import memllm.cli.common as common
    from memllm.cli.app import app
    from memllm.llm import MemLLM
    from memllm.memory_stores.embeddings import FakeEmbedder
    from tests.foundation.tiny_gguf import write_tiny_llama_gguf
    from tests.security import test_hostile as th

    llm = MemLLM.from_pretrained(str(write_tiny_llama_gguf(tmp / "tiny.gguf", context=8192)), device="cpu")
    common.load_llm = lambda model, device, dtype=None: llm  # type: ignore[assignment]
    common.load_embedder = lambda: FakeEmbedder(dim=64)  # type: ignore[assignment]
    runner = CliRunner()
    counts: dict[str, Counter] = {}
    examples: dict[str, list] = {}

    def record(kind: str, res, what) -> None:
        o = outcome(res)
        counts.setdefault(kind, Counter())[o] += 1
        if o in ("traceback", "other error output"):
            examples.setdefault(kind, []).append({"input": repr(what)[:300], "output": res.output[-500:]})

    doc = tmp / "doc.txt"
    doc.write_text("The red door is number 13. The blue door is number 7. " * 150)
    saved = tmp / "saved"
    assert runner.invoke(app, ["ask", str(doc), "--save-memory", str(saved), "--mode", "kv"]).exit_code == 0
    n = 0

    def fresh_copy() -> Path:
        nonlocal n
        n += 1
        dst = tmp / f"copy{n}"
        shutil.copytree(saved, dst)
        return dst

    for name, corrupt in th.CORRUPTIONS.items():
        folder = fresh_copy()
        corrupt(folder)
        record("corrupt saved memory (listed)", runner.invoke(app, ["ask", "--memory", str(folder), "-q", "x"]), name)
        shutil.rmtree(folder)
    for name, row in th.BAD_ROWS.items():
        src = tmp / "rows.jsonl"
        src.write_text(json.dumps(row, allow_nan=True) + "\n")
        res = runner.invoke(app, ["memory", "import", str(src), "--user", "u", "--store", str(tmp / "s")])
        record("import row of a wrong type (listed)", res, name)
    fuzz = settings(max_examples=args.examples, deadline=None, suppress_health_check=list(HealthCheck),
                    database=None)  # fmt: skip

    @fuzz
    @given(field=th.st.sampled_from(["layers", "spec", "files", "tokens", "memory", "namespace", "fingerprint",
                                     "generation", "extra", "version", "seen", "cut", "base", "units"]),
           value=th.JSON)  # fmt: skip
    def manifests(field, value) -> None:
        folder = fresh_copy()

        def edit(m):
            if field in ("seen", "cut", "base", "units"):
                m["layers"][0][field] = value
            else:
                m[field] = value

        th._edit_manifest(folder, edit)
        record("edited snapshot manifest (generated)", runner.invoke(app, ["ask", "--memory", str(folder), "-q", "x"]),
               (field, value))  # fmt: skip
        shutil.rmtree(folder)

    @fuzz
    @given(rows=th.st.lists(th.ROW, min_size=1, max_size=3))
    def rows(rows) -> None:
        src = tmp / "rows.jsonl"
        src.write_text("".join(json.dumps(r) + "\n" for r in rows))
        store = str(tmp / "fuzzstore")
        res = runner.invoke(app, ["memory", "import", str(src), "--user", "u", "--store", store])
        record("import rows (generated)", res, rows)
        record("memory list after an import (generated)",
               runner.invoke(app, ["memory", "list", "--user", "u", "--store", store]), rows)  # fmt: skip

    @fuzz
    @given(cmd=th.st.sampled_from([
        ["memory", "list", "--limit"], ["memory", "search", "q", "--k"], ["chat", "--max-new-tokens"],
        ["chat", "--user"], ["chat", "--memory"], ["chat", "--memory-tokens"],
        ["ask", "-", "-q", "x", "--max-new-tokens"], ["ask", "-", "-q", "x", "--mode"],
    ]), value=th.OPTION_VALUES)  # fmt: skip
    def options(cmd, value) -> None:
        a = [*cmd, value]
        if cmd[0] == "memory":
            a += ["--user", "u"]
        if cmd[0] in ("memory", "chat"):
            a += ["--store", str(tmp / "optstore")]
        record("CLI option value (generated)", runner.invoke(app, a, input="hello\n"), a)

    try:
        manifests()
        rows()
        options()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    table = {k: dict(v) | {"tried": sum(v.values())} for k, v in counts.items()}
    print(f"{'kind':42} {'tried':>6} {'one-line error':>15} {'usage error':>12} {'accepted':>9} {'tracebacks':>11}")
    for k, v in table.items():
        print(f"{k:42} {v['tried']:6} {v.get('one-line error', 0):15} {v.get('usage error', 0):12} {v.get('accepted', 0):9} "
              f"{v.get('traceback', 0) + v.get('other error output', 0):11}")  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps({"command": " ".join(sys.argv), "counts": table, "failures": examples},
                                       indent=1) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
