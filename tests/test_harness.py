"""The benchmark harness (benchmarks/common.py): provenance, and a results folder written only from a clean tree."""
from pathlib import Path

import pytest

import common


def test_provenance_records_commit_command_machine_and_date():
    run = common.provenance(common.HERE / "vision" / "vision.py", ["--quick"])
    assert run["command"] == "python benchmarks/vision/vision.py --quick"
    assert set(run["machine"]) >= {"cores", "threads", "torch", "python"} and run["machine"]["cores"] >= 1
    assert run["date"].endswith("Z") and "dirty" in run
    line = common.provenance_md(run)
    assert run["command"] in line and "CPU cores" in line


def test_a_results_folder_is_refused_from_a_dirty_tree_and_allow_dirty_goes_to_scratch(monkeypatch, tmp_path):
    results = common.HERE / "vision" / "results"
    monkeypatch.setattr(common, "git_state", lambda where=common.HERE: {"commit": "0" * 40, "git": "0000000-dirty",
                                                                        "changed": ["src/torchdkm/api.py"]})
    with pytest.raises(SystemExit, match="uncommitted changes in src/torchdkm/api.py.*--allow-dirty"):
        common.output_path(results)
    scratch = common.output_path(results / "x.json", allow_dirty=True)
    assert scratch == common.HERE / "scratch" / "vision" / "results" / "x.json"
    assert common.output_path(tmp_path) == tmp_path  # outside the results folders: as given
    monkeypatch.setattr(common, "git_state", lambda where=common.HERE: {"commit": "0" * 40, "git": "0000000",
                                                                        "changed": []})
    assert common.output_path(results) == results  # clean: written where asked


def test_git_state_ignores_changes_inside_the_results_folders():
    state = common.git_state()
    if not state:
        pytest.skip("not a git checkout")
    assert not any("/results/" in f and f.startswith("benchmarks/") for f in state["changed"])
    assert len(state["commit"]) == 40


def test_write_json_adds_the_runs_provenance(tmp_path):
    class A:
        out = tmp_path

    run = common.start(common.HERE / "engine" / "dkm_step.py", A(), ["--quick"])
    try:
        common.write_json(tmp_path / "r.json", {"rows": []})
        import json

        assert json.loads(Path(tmp_path / "r.json").read_text())["provenance"] == run
    finally:
        common._RUN.clear()


def test_every_benchmark_script_imports_and_runs_standalone_from_its_domain_folder():
    import importlib
    import subprocess
    import sys

    scripts = sorted(p for d in common.DOMAINS for p in (common.HERE / d).glob("*.py"))
    assert {p.parent.name for p in scripts} == set(common.DOMAINS)
    for p in scripts:
        if p.stem == "mobilenet_v2":  # its import looks for an optional weights package
            continue
        importlib.import_module(p.stem)
    for rel in ("engine/dkm_step.py", "engine/artifact_sizes.py", "text/nlp.py"):  # as a user runs them
        r = subprocess.run([sys.executable, str(common.HERE / rel), "--help"], capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0 and "--allow-dirty" in r.stdout, (rel, r.stderr[-2000:])


def _git_repo(folder):
    """An empty git repository in ``folder``; returns a function running git there."""
    import subprocess

    def git(*a):
        subprocess.run(["git", *a], cwd=folder, check=True, capture_output=True)

    git("init", "-q")
    git("config", "user.email", "t@t")
    git("config", "user.name", "t")
    return git


def test_git_state_reads_the_first_changed_path_whole(tmp_path):
    git = _git_repo(tmp_path)
    (tmp_path / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("commit", "-qm", "a")
    (tmp_path / "a.py").write_text("x = 2\n")
    assert common.git_state(tmp_path)["changed"] == ["a.py"]


def test_a_runs_own_results_do_not_mark_the_code_dirty(tmp_path, monkeypatch):
    """A second run in the same checkout sees the first one's results modified: the commit it records stays clean;
    a changed source file marks it dirty."""
    git = _git_repo(tmp_path)
    results = tmp_path / "benchmarks" / "llm" / "results"
    results.mkdir(parents=True)
    (tmp_path / "a.py").write_text("x = 1\n")
    (results / "r.json").write_text("{}\n")
    git("add", "a.py", "benchmarks")
    git("commit", "-qm", "a")
    monkeypatch.setattr(common, "HERE", tmp_path / "benchmarks")
    (results / "r.json").write_text('{"rows": [1]}\n')
    state = common.git_state(tmp_path)
    assert state["changed"] == [] and not state["git"].endswith("-dirty")
    (tmp_path / "a.py").write_text("x = 2\n")
    state = common.git_state(tmp_path)
    assert state["changed"] == ["a.py"] and state["git"].endswith("-dirty")
