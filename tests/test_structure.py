"""Package structure: installed as ``labelnext.*``, stages never import the job layer, declared contracts."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pyarrow as pa
import pytest

from labelnext.ops.core.contract import ContractError, StageContract

REPO = Path(__file__).resolve().parent.parent
STAGE_PACKAGE = REPO / "ops"


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every module a file imports (absolute names; relative imports resolved against ``labelnext.ops``)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                out.append((node.lineno, "labelnext.ops." + (node.module or "")))
            else:
                out.append((node.lineno, node.module or ""))
    return out


def test_stages_never_import_the_job_layer():
    upward = []
    for path in sorted(STAGE_PACKAGE.rglob("*.py")):
        for line, name in _imports(path):
            if name == "labelnext.pipelines" or name.startswith(("labelnext.pipelines.", "pipelines")):
                upward.append(f"{path.relative_to(REPO)}:{line} imports {name}")
    assert not upward, "stages import the job layer:\n" + "\n".join(upward)


def test_no_module_imports_the_bare_folder_names():
    bare = []
    for folder in ("ops", "pipelines", "tests", "bench"):
        for path in sorted((REPO / folder).rglob("*.py")):
            for line, name in _imports(path):
                if name.split(".")[0] in ("ops", "pipelines"):
                    bare.append(f"{path.relative_to(REPO)}:{line} imports {name}")
    assert not bare, "imports of top-level ops/pipelines (installed as labelnext.*):\n" + "\n".join(bare)


def test_the_word_pipelines_never_appears_in_the_stage_package():
    hits = [str(p.relative_to(REPO)) for p in STAGE_PACKAGE.rglob("*.py") if "pipelines" in p.read_text()]
    assert not hits, hits


def test_contract_names_stage_and_missing_column():
    contract = StageContract("embed", needs=("doc_id", "text"), adds=("embedding",))
    contract.check_input(["doc_id", "text", "extra"])
    with pytest.raises(ContractError, match=r"stage embed: its input lacks column 'text'"):
        contract.check_input(["doc_id"])
    with pytest.raises(ContractError, match=r"stage embed: its output lacks column 'embedding'"):
        contract.check_output(["doc_id", "text"])


def test_every_stage_declares_a_contract():
    from labelnext.ops.cluster import candidates
    from labelnext.ops.cluster import kmeans as cluster
    from labelnext.ops.embed import encoder as embed
    from labelnext.ops.io import read
    from labelnext.ops.score import scorer as score
    from labelnext.ops.select import selector as select
    from labelnext.ops.select.selector import SelectConfig

    for module in (read, embed, cluster, candidates, score):
        assert isinstance(module.CONTRACT, StageContract), module.__name__
    assert "uncertainty" not in select.contract(SelectConfig(rule="cluster_only")).needs
    assert "uncertainty" not in select.contract(SelectConfig(rule="stratified")).needs
    assert "uncertainty" in select.contract(SelectConfig(rule="typical_uncertain")).needs


def test_pipeline_check_names_the_stage(tmp_path):
    from labelnext.ops.embed import encoder as embed
    from labelnext.pipelines.selection import PipelineError, SelectionPipeline

    with pytest.raises(PipelineError, match=r"stage embed: its input lacks column 'text'"):
        SelectionPipeline._check(embed.CONTRACT, pa.table({"doc_id": ["a"]}))


def test_score_exactly_once_drops_retried_rows_and_fails_on_missing():
    from labelnext.pipelines.selection import PipelineError, exactly_once

    expected = pa.chunked_array([["a", "b", "c"]])
    scored = pa.table({"doc_id": ["b", "a", "b", "c"], "uncertainty": [1.0, 2.0, 1.5, 3.0]})
    out, repeated = exactly_once(expected, scored)
    assert repeated == 1 and sorted(out.column("doc_id").to_pylist()) == ["a", "b", "c"]
    assert out.num_rows == 3
    with pytest.raises(PipelineError, match=r"stage score: 1 candidates never came back \(e.g. 'c'\)"):
        exactly_once(expected, scored.slice(0, 3))
    with pytest.raises(PipelineError, match=r"stage score: 1 rows are not candidates"):
        exactly_once(pa.chunked_array([["a", "b"]]), pa.table({"doc_id": ["a", "b", "z"]}))


def test_packaged_configs_by_name_and_path():
    from labelnext.pipelines.config import ConfigError, load_config, packaged_configs

    assert {"local", "cluster-h100", "nightly"} <= set(packaged_configs())
    assert load_config("cluster-h100").resources.score.device == "cuda"
    assert load_config("nightly").cluster.warm_start
    assert load_config(REPO / "configs" / "local.yaml") == load_config()
    with pytest.raises(ConfigError, match="unknown config 'nope'.*cluster-h100, .*local, nightly"):
        load_config("nope")
    with pytest.raises(ConfigError, match="config file not found: missing.yaml"):
        load_config("missing.yaml")


def _deps_site() -> str:
    return sysconfig.get_paths()["purelib"]


@pytest.mark.slow
def test_wheel_install_runs_from_an_empty_folder(tmp_path, sample_corpus):
    """``pip install .`` (not editable) into a fresh venv, then ``labelnext run`` from an empty folder.

    The fresh venv sees this environment's third-party packages through a ``.pth`` line (no network needed),
    but not its editable ``labelnext``: a ``.pth`` inside a folder added that way is not processed.
    """
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(dist), str(REPO)], check=True, capture_output=True, timeout=600)
    wheel = next(dist.glob("labelnext-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "labelnext-test-deps.pth").write_text(_deps_site() + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                    "--target", site, str(wheel)], check=True, capture_output=True, timeout=600)
    # Console script as pip would write it for the new venv.
    (venv / "bin" / "labelnext").write_text(
        f"#!{py}\nimport sys\nfrom labelnext.pipelines.cli import main\nsys.exit(main())\n")
    (venv / "bin" / "labelnext").chmod(0o755)

    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
    env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '')}"

    def python(code: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(py), "-c", code], cwd=empty, env=env, capture_output=True, text=True)

    assert python("import ops").returncode != 0
    assert python("import pipelines").returncode != 0
    found = python("import labelnext.ops.embed.encoder, labelnext.pipelines.cli; print(labelnext.ops.embed.encoder.__file__)")
    assert found.returncode == 0, found.stderr
    assert found.stdout.strip().startswith(site), found.stdout  # the wheel, not the source tree
    assert not (Path(site) / "ops").exists() and not (Path(site) / "pipelines").exists()

    out = tmp_path / "out"
    proc = subprocess.run([str(venv / "bin" / "labelnext"), "run", "--corpus", str(sample_corpus), "--output",
                           str(out), "--budget", "20", "--run-id", "wheel", "--set", "ray.num_cpus=2"],
                          cwd=empty, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    manifests = list(out.glob("run_date=*/run_id=wheel/manifest.json"))
    assert len(manifests) == 1
    manifest = json.loads(manifests[0].read_text())
    assert manifest["status"] == "committed" and manifest["counts"]["selected"] == 20
    assert list(empty.iterdir()) == []  # nothing written beside the caller


# -- import circles and room sizes ---------------------------------------------------------------------------
CHECKED_FOLDERS = ("ops", "pipelines", "bench")
MAX_MODULE_LINES = 500
MAX_PIPELINE_CLASS_LINES = 300


def _module_name(path: Path) -> str:
    """``ops/select/margin.py`` -> ``labelnext.ops.select.margin``; ``bench/loop.py`` -> ``bench.loop``."""
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["labelnext", *parts] if parts[0] in ("ops", "pipelines") else parts)


def import_graph() -> dict[str, set[str]]:
    """Each module of ops/, pipelines/ and bench/ -> the modules of those folders it imports (absolute
    ``labelnext.*`` and ``bench.*`` imports anywhere in the file, function-level ones included)."""
    modules = {_module_name(p): p for folder in CHECKED_FOLDERS for p in sorted((REPO / folder).rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                # ``from pkg import mod`` imports a module when ``pkg.mod`` is one.
                targets.update([node.module, *(f"{node.module}.{alias.name}" for alias in node.names)])
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every circle a depth-first walk meets, each as the modules around it (first one repeated at the end)."""
    state: dict[str, int] = {}  # 1: on the walk's path, 2: done
    path: list[str] = []
    circles: list[list[str]] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                circles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    return circles


def test_import_circles_are_found():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert import_circles(graph) == [["a", "b", "c", "a"]]
    assert import_circles({"a": {"b"}, "b": set()}) == []


def test_import_graph_sees_function_level_and_from_imports():
    graph = import_graph()
    assert "labelnext.ops.embed.tokenize" in graph["labelnext.pipelines.embed_stage"]  # inside a function
    assert "labelnext.pipelines.read_stage" in graph["labelnext.pipelines.selection"]  # from pkg import mod


def test_no_import_circles_in_ops_pipelines_or_bench():
    circles = import_circles(import_graph())
    assert not circles, "import circles:\n" + "\n".join(" -> ".join(c) for c in circles)


def _own_python_files(skip: tuple[str, ...]) -> list[Path]:
    """The checkout's Python files, without the environment, build outputs, hidden folders and ``skip``."""
    files = []
    for top in sorted(REPO.iterdir()):
        if top.name in skip or top.name.startswith(".") or top.name in ("build", "dist", "site"):
            continue
        files += [top] if top.suffix == ".py" else sorted(top.rglob("*.py")) if top.is_dir() else []
    return files


def test_no_module_outside_bench_is_over_500_lines():
    long = [f"{p.relative_to(REPO)}: {n} lines" for p in _own_python_files(skip=("bench",))
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES]
    assert any(p.name == "selection.py" for p in _own_python_files(skip=("bench",)))
    assert not long, f"modules over {MAX_MODULE_LINES} lines:\n" + "\n".join(long)


def test_selection_pipeline_class_stays_small():
    """The pipeline reads as the data flow; the label loop and each stage's helpers live in modules of their own."""
    tree = ast.parse((REPO / "pipelines" / "selection.py").read_text())
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "SelectionPipeline"]
    lines = cls.end_lineno - cls.lineno + 1
    assert lines < MAX_PIPELINE_CLASS_LINES, f"SelectionPipeline is {lines} lines"
