import json
import subprocess
import sys

from typer.testing import CliRunner

from conftest import ROOT, write_jsonl
from gemma2_tune import __version__
from gemma2_tune.cli import app

runner = CliRunner()
TINY = ["--model", "builtin:tiny-gemma2"]


def invoke(*args):
    return runner.invoke(app, list(args))


def test_help_and_version():
    from typer.main import get_command

    r = invoke("--help")
    assert r.exit_code == 0
    # every command, in the order --help lists them: one per training method first (the registry's), then the rest
    assert list(get_command(app).commands) == [
        "sft", "distill", "dpo", "reward", "rl", "chat", "merge", "merge-models", "serve", "export", "eval",
        "validate", "preview", "plan", "build-model", "models", "recipes", "config"]
    for command in ("sft", "validate", "preview", "recipes"):
        assert command in r.output
    r = invoke("--version")
    assert r.exit_code == 0 and __version__ in r.output


def test_recipes_lists_bundled_recipes():
    r = invoke("recipes")
    assert r.exit_code == 0
    assert "quickstart-cpu" in r.output and "gemma-2-27b-full-zero3" in r.output


def test_validate_ok_and_json():
    r = invoke("validate", "recipes/quickstart-cpu.yaml")
    assert r.exit_code == 0 and "ok:" in r.output
    r = invoke("validate", "gemma-2-9b-qlora", "--json")
    data = json.loads(r.output)
    assert r.exit_code == 0 and data["valid"] and data["config"]["lora"]["r"] == 16


def test_validate_reports_every_problem_exit_2_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  attn_implementation: sdpa\nlora:\n  rank: 8\n")
    r = invoke("validate", str(bad))
    assert r.exit_code == 2
    assert "lora.rank" in r.output and "unknown key" in r.output
    assert "Traceback" not in r.output
    r = invoke("validate", str(bad), "--json", "--set", "training.learning_rate=-1")
    data = json.loads(r.output)
    assert r.exit_code == 2 and not data["valid"]
    assert any("lora.rank" in e for e in data["errors"]) and any("training.learning_rate" in e for e in data["errors"])


def test_validate_missing_recipe():
    r = invoke("validate", "no/such/recipe.yaml")
    assert r.exit_code == 2 and "no such recipe" in r.output


def test_dry_run_prints_resolved_config_and_trains_nothing(tmp_path):
    out = tmp_path / "run"
    r = invoke("sft", "--recipe", "quickstart-cpu", "--set", "lora.r=8", "--learning-rate", "1e-3",
               "--output-dir", str(out), "--dry-run")
    assert r.exit_code == 0, r.output
    assert "r: 8" in r.output and "learning_rate: 0.001" in r.output
    assert "LoRA r=8" in r.output and "dry run" in r.output
    assert not out.exists()


def test_sft_bad_inputs_exit_2_with_message_and_nothing_written(tmp_path):
    out = tmp_path / "run"
    r = invoke("sft", "--model", "builtin:tiny-gemma2", "--dataset", str(tmp_path / "missing.jsonl"), "-o", str(out))
    assert r.exit_code == 2 and "no such dataset file" in r.output and "Traceback" not in r.output
    assert not out.exists()
    r = invoke("sft", "--set", "training.lr=1", "--max-steps", "0")
    assert r.exit_code == 2 and "training.lr" in r.output and "training.max_steps (--max-steps)" in r.output
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "a"}]}])
    r = invoke("sft", *TINY, "--dataset", str(bad), "-o", str(out), "--set", "data.on_bad_rows=error")
    assert r.exit_code == 2 and "bad.jsonl line 1" in r.output
    assert not out.exists()


def test_sft_refuses_a_foreign_non_empty_output_dir(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    for extra in ([], ["--overwrite"]):
        r = invoke("sft", *TINY, "--dataset", "quickstart", "-o", str(out), "--max-steps", "1", *extra)
        assert r.exit_code == 2 and "holds no gemma2-tune run" in r.output
    assert (out / "notes.txt").read_text() == "precious"


def test_preview_marks_supervised_spans_and_counts():
    r = invoke("preview", *TINY, "--dataset", "quickstart", "-n", "2")
    assert r.exit_code == 0, r.output
    assert r.output.count("── ") == 3  # two rows and the summary
    assert "⟦Mount Everest is the tallest mountain above sea level, at about 8,849 metres.<end_of_turn>⟧" in r.output
    assert "supervised" in r.output and "36 read, 35 kept, 1 bad" in r.output


def run(*args, **kw):
    return subprocess.run(list(args), capture_output=True, text=True, cwd=ROOT, timeout=120, **kw)


def test_module_and_console_script_subprocess(tmp_path):
    r = run(sys.executable, "-m", "gemma2_tune", "--help")
    assert r.returncode == 0 and "validate" in r.stdout
    script = ROOT / ".venv" / "bin" / "gemma2-tune"
    exe = str(script) if script.exists() else "gemma2-tune"
    r = run(exe, "validate", "recipes/gemma-2-27b-qlora.yaml")
    assert r.returncode == 0 and "ok:" in r.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  learning_rate: -1\n")
    r = run(exe, "validate", str(bad))
    assert r.returncode == 2 and "training.learning_rate" in r.stderr and "Traceback" not in r.stderr


def test_validate_and_help_do_not_import_torch():
    code = ("import sys; from typer.testing import CliRunner; from gemma2_tune.cli import app; "
            "r = CliRunner().invoke(app, ['validate', 'quickstart-cpu']); assert r.exit_code == 0, r.output; "
            "r = CliRunner().invoke(app, ['sft', '--recipe', 'quickstart-cpu', '--dry-run', '-o', '/nonexistent/x']); "
            "assert r.exit_code == 0, r.output; "
            "print(sorted(m for m in ('torch', 'transformers', 'trl', 'datasets') if m in sys.modules))")
    r = run(sys.executable, "-c", code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_no_bracketed_text_of_a_help_is_lost():
    """Rich reads "[word]" as markup: `--help` showed "pip install 'gemma2-tune'" for "'gemma2-tune[export]'" and
    "-> list" for "-> list[float]". Every command's help, docstring and options' help is shown as typed."""
    import inspect
    import re
    import typing

    from typer.main import get_command

    bracketed = re.compile(r"\[[a-zA-Z#/@][^\[\]]*\]")
    commands = get_command(app).commands
    checked = 0
    for name, command in commands.items():
        callback = inspect.unwrap(command.callback)
        texts = [callback.__doc__ or "", command.help or ""]
        for annotation in typing.get_type_hints(callback, include_extras=True).values():
            texts += [getattr(info, "help", None) or "" for info in getattr(annotation, "__metadata__", ())]
        wanted = {m for text in texts for m in bracketed.findall(text.replace("\\[", "["))}
        if not wanted:
            continue
        r = runner.invoke(app, [name, "--help"], env={"COLUMNS": "2000"})
        shown = " ".join(r.output.split())
        assert r.exit_code == 0 and all(w in shown for w in wanted), (name, [w for w in wanted if w not in shown])
        checked += len(wanted)
    r = runner.invoke(app, ["--help"], env={"COLUMNS": "2000"})
    assert "'gemma2-tune[export]'" in r.output
    assert checked >= 2  # export's install hint, rl's list[float] at least


def test_preview_of_a_pairs_file_shows_them_as_dpo_trains_them(tmp_path):
    """Was: every row refused ("a preference pair, not a chat") unless --set method=dpo was given."""
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "Hi?", "chosen": "Hello, friend.", "rejected": "Sure thing."}] * 3)
    r = invoke("preview", *TINY, "--dataset", str(pairs), "-n", "1")
    assert r.exit_code == 0, r.output
    assert f"{pairs}: preference pairs (chosen/rejected), shown as `dpo` trains them" in r.output
    assert "chosen, " in r.output and "rejected, " in r.output and "3 read, 3 kept" in r.output
    r = invoke("preview", *TINY, "--dataset", "quickstart", "-n", "1")  # chats: as sft trains them, as before
    assert r.exit_code == 0 and "shown as `dpo`" not in r.output


def test_eval_on_an_empty_dataset_says_so_before_loading_a_model(tmp_path, monkeypatch):
    import gemma2_tune.after.inference as inference

    monkeypatch.setattr(inference, "load", lambda *a, **k: (_ for _ in ()).throw(AssertionError("a model loaded")))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    r = invoke("eval", *TINY, "--dataset", str(empty))
    assert r.exit_code == 2 and f"data.dataset: '{empty}' has no rows" in r.output, r.output


def test_the_eval_suites_the_request_knows_are_the_harness_suites():
    from gemma2_tune.after.harness import SUITES
    from gemma2_tune.config.requests import EVAL_SUITES

    assert tuple(SUITES) == EVAL_SUITES
