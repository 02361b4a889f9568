"""Honest inputs: a path is never a hub lookup, missing files and globs that select
nothing are validation errors (exit 2, field named, nothing logged), a hub id is
pinned to a commit, a stage that changes nothing is refused, and the cache key's code
version follows the source files and the torch/transformers versions."""

from __future__ import annotations

import ast
import hashlib
import json
import shutil
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import pytest
import yaml
from typer.testing import CliRunner

from squeezeflow.cli import app
from squeezeflow.compression.catalog import CATALOG
from squeezeflow.compression.changes import UnchangedStageError, require_change, stage_baseline
from squeezeflow.compression.models import resolve_source, source_kind
from squeezeflow.compression.runners import run_stage_steps
from squeezeflow.recipe import ModelSpec, RecipeError, load_recipe
from squeezeflow.registry.lineage import hub_commit_tags
from squeezeflow.tasks.refs import SOURCE_PACKAGES, code_version, package_roots, source_sha256
from squeezeflow.testing import tiny_llama, write_texts

REPO = Path(__file__).resolve().parents[1]
COMMIT = "3f1e0c9a" * 5  # a 40-hex commit sha the fake hub serves


@pytest.fixture(scope="module")
def llama_config() -> str:
    """config.json of a 2-block Llama (hidden 64): every check here reads only this."""
    model, _ = tiny_llama(hidden=64, layers=2, heads=4, intermediate=128)
    return str(model.config.to_json_string())


@pytest.fixture
def recipe_dir(tmp_path: Path, llama_config: str) -> Path:
    """A recipe folder with its data files and a config-only model folder beside it."""
    folder = tmp_path / "recipes"
    write_texts(folder / "data" / "calibration.txt", 8, seed=1)
    write_texts(folder / "data" / "evaluation.txt", 8, seed=2)
    (folder / "models" / "llama").mkdir(parents=True)
    (folder / "models" / "llama" / "config.json").write_text(llama_config)
    return folder


@pytest.fixture
def quiet_workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working directory with no registry or workspace configured: any store,
    run or checkpoint that validation created would land in it."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for name in ("MLFLOW_TRACKING_URI", "SQUEEZEFLOW_HOME", "PREFECT_HOME", "SQUEEZEFLOW_STRICT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # `~/nope` must be missing
    return work


def recipe(source: str = "./models/llama", steps: list[dict[str, object]] | None = None,
           **overrides: object) -> dict[str, object]:
    raw: dict[str, object] = {
        "name": "t",
        "model": {"source": source},
        "calibration": {"source": "data/calibration.txt"},
        "evaluation": {"data": {"source": "data/evaluation.txt"}},
        "stages": [{"name": "q", "steps": steps or [{"kind": "rtn", "bits": 8}]}],
        "registration": {"model_name": "m"},
    }
    raw.update(overrides)
    return raw


def write(folder: Path, raw: dict[str, object]) -> Path:
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def validate(path: Path, *options: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["validate", str(path), *options])
    return result.exit_code, result.output


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"model": {"source": "./models/nope"}},
         "model.source: ./models/nope is a local path and {dir}/models/nope does not exist"),
        ({"model": {"source": "{tmp}/abs/nope"}},
         "model.source: {tmp}/abs/nope is a local path and {tmp}/abs/nope does not exist"),
        ({"model": {"source": "~/nope"}}, "model.source: ~/nope is a local path and {tmp}/home/nope"),
        # `models/` is a folder beside the recipe, so `models/nope` names a folder there
        ({"model": {"source": "models/nope"}}, "model.source: models/nope is a local path"),
        ({"model": {"source": "./data"}}, "model.source: {dir}/data has no config.json"),
        ({"calibration": {"source": "data/nope.txt"}},
         "calibration.source: data file data/nope.txt does not exist ({dir}/data/nope.txt)"),
        ({"evaluation": {"data": {"source": "held-out.jsonl"}}},
         "evaluation.data.source: data file held-out.jsonl does not exist"),
        ({"training": {"source": "./texts"},
          "stages": [{"name": "kd", "steps": [{"kind": "distill"}]}]},
         "training.source: data file ./texts does not exist"),
        ({"calibration": {"source": "data"}}, "calibration.source: {dir}/data is not a data file"),
        ({"training": {"source": "data/calibration.txt"},
          "stages": [{"name": "kd", "steps": [{"kind": "distill", "teacher": "./teachers/nope"}]}]},
         "stages.0.steps.0.teacher: ./teachers/nope is a local path and {dir}/teachers/nope"),
        ({"stages": [{"name": "q", "steps": [{"kind": "rtn", "targets": ["*q_prj"]}]}]},
         "stages.0.steps.0.targets: '*q_prj' matches no module of the model; its "
         "LlamaForCausalLM has modules like model.layers.0.self_attn.q_proj"),
        ({"stages": [{"name": "q", "steps": [{"kind": "rtn", "ignore": ["*self_atn*"]}]}]},
         "stages.0.steps.0.ignore: '*self_atn*' matches no module of the model"),
        # matches a module, but an Embedding, which rtn does not quantize
        ({"stages": [{"name": "q", "steps": [{"kind": "rtn", "targets": ["*embed_tokens"]}]}]},
         "stages.0.steps.0.targets: the step selects no module of the model"),
        ({"stages": [{"name": "q", "steps": [{"kind": "magnitude", "ignore": ["*"]}]}]},
         "stages.0.steps.0.ignore: the step selects no module of the model"),
        # checked against the model as the first stage leaves it: 1 block, no layers.1
        ({"stages": [{"name": "d", "steps": [{"kind": "depth", "remove": 1}]},
                     {"name": "q", "steps": [{"kind": "rtn", "targets": ["model.layers.1.*"]}]}]},
         "stages.1.steps.0.targets: 'model.layers.1.*' matches no module of the model"),
    ],
)
def test_validate_names_the_missing_input_exits_2_and_logs_nothing(
    recipe_dir: Path, quiet_workdir: Path, tmp_path: Path,
    overrides: dict[str, object], message: str,
) -> None:
    raw = json.loads(json.dumps(recipe(**overrides)).replace("{tmp}", str(tmp_path)))
    path = write(recipe_dir, raw)
    before = files_under(recipe_dir)
    code, output = validate(path)
    assert code == 2, output
    assert message.format(dir=recipe_dir, tmp=tmp_path) in output
    assert list(quiet_workdir.iterdir()) == []  # no mlflow.db, mlruns, .prefect, .squeezeflow
    assert files_under(recipe_dir) == before
    assert not (tmp_path / "home").exists()


def test_every_missing_input_is_named_at_once(recipe_dir: Path, quiet_workdir: Path) -> None:
    raw = recipe("./models/nope", calibration={"source": "data/nope.txt"},
                 evaluation={"data": {"source": "data/gone.txt"}})
    with pytest.raises(RecipeError) as error:
        load_recipe(write(recipe_dir, raw))
    lines = str(error.value).splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "model.source", "calibration.source", "evaluation.data.source"]


def test_matching_globs_and_copied_default_ignores_pass(recipe_dir: Path, quiet_workdir: Path) -> None:
    steps: list[dict[str, object]] = [
        {"kind": "rtn", "targets": ["*q_proj", "*k_proj"], "ignore": ["*lm_head*", "*pooler*"]}]
    code, output = validate(write(recipe_dir, recipe(steps=steps)))
    assert code == 0, output
    loaded = load_recipe(recipe_dir / "recipe.yaml")
    assert loaded.model.source == str(recipe_dir / "models" / "llama")  # made absolute
    assert loaded.calibration is not None
    assert loaded.calibration.source == str(recipe_dir / "data" / "calibration.txt")
    assert loaded.warnings == ()


def test_globs_after_a_step_the_config_cannot_describe_are_left_to_the_run(
    recipe_dir: Path, quiet_workdir: Path
) -> None:
    # lowrank replaces each Linear by in_factor/out_factor: names config.json cannot show
    raw = recipe(stages=[
        {"name": "f", "steps": [{"kind": "lowrank", "rank": 8}]},
        {"name": "q", "steps": [{"kind": "rtn", "targets": ["*in_factor", "*out_factor"]}]},
    ])
    code, output = validate(write(recipe_dir, raw))
    assert code == 0, output


def test_source_kinds(recipe_dir: Path, quiet_workdir: Path) -> None:
    assert source_kind("default") == "default"
    assert source_kind("models:/m/1") == "registry"
    for path in ("./x", "../x", "/x", "~/x", "a/b/c", "has space", "models/llama"):
        assert source_kind(path, recipe_dir) == "path", path
    for hub_id in ("gpt2", "Qwen/Qwen2-0.5B", "org/name.v1_2"):
        assert source_kind(hub_id, recipe_dir) == "hub", hub_id
    # without a recipe folder, `models/llama` has only the shape of a hub id
    assert source_kind("models/llama") == "hub"


class FakeHub:
    """A local stand-in for the hub's model-info and file endpoints, counting requests."""

    def __init__(self, models: dict[str, dict[str, tuple[str, str]]]) -> None:
        self.models = models  # repo id -> revision -> (commit, config.json)
        self.requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep the test output clean
                pass

            def do_GET(self) -> None:
                self._answer(head=False)

            def do_HEAD(self) -> None:
                self._answer(head=True)

            def _answer(self, head: bool) -> None:
                path = unquote(self.path.split("?")[0])
                hub.requests.append(path)
                status, body, headers = hub.answer(path)
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self, path: str) -> tuple[int, bytes, dict[str, str]]:
        if path.startswith("/api/models/"):
            repo, _, revision = path.removeprefix("/api/models/").partition("/revision/")
            if repo not in self.models:
                return 404, b"{}", {"X-Error-Code": "RepoNotFound"}
            if (revision or "main") not in self.models[repo]:
                return 404, b"{}", {"X-Error-Code": "RevisionNotFound"}
            commit, _ = self.models[repo][revision or "main"]
            return 200, json.dumps({"id": repo, "sha": commit}).encode(), {}
        for repo, revisions in self.models.items():
            revision, _, name = path.removeprefix(f"/{repo}/resolve/").partition("/")
            served = [entry for key, entry in revisions.items() if revision in (key, entry[0])]
            if path.startswith(f"/{repo}/resolve/") and served and name == "config.json":
                commit, config = served[0]
                etag = hashlib.sha1(config.encode()).hexdigest()
                return 200, config.encode(), {"X-Repo-Commit": commit, "ETag": f'"{etag}"'}
        return 404, b"", {"X-Error-Code": "EntryNotFound"}


def use_endpoint(monkeypatch: pytest.MonkeyPatch, url: str, cache: Path) -> None:
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # conftest sets HF_HUB_OFFLINE=1


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, llama_config: str) -> Iterator[FakeHub]:
    fake = FakeHub({"org/llama": {"main": (COMMIT, llama_config)}})
    use_endpoint(monkeypatch, fake.url, tmp_path / "hub-cache")
    yield fake
    fake.server.shutdown()


@pytest.fixture
def unreachable_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nothing listens on: the connection is refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    use_endpoint(monkeypatch, f"http://127.0.0.1:{port}", tmp_path / "hub-cache")


def test_a_hub_id_is_checked_at_the_commit_it_names(
    hub: FakeHub, recipe_dir: Path, quiet_workdir: Path
) -> None:
    # the checks run on the hub model's config: a misspelled glob is found there too
    bad = recipe("org/llama", steps=[{"kind": "rtn", "targets": ["*q_prj"]}])
    code, output = validate(write(recipe_dir, bad))
    assert code == 2 and "stages.0.steps.0.targets: '*q_prj' matches no module" in output, output
    assert f"/org/llama/resolve/{COMMIT}/config.json" in hub.requests  # read at the commit
    code, output = validate(write(recipe_dir, recipe("org/llama")))
    assert code == 0 and "warning" not in output, output
    assert ModelSpec(source="org/llama").pinned().revision == COMMIT
    local = str(recipe_dir / "models" / "llama")
    assert ModelSpec(source=local).pinned() == ModelSpec(source=local)
    assert hub_commit_tags("org/llama", COMMIT) == {"base_hub_id": "org/llama", "base_hub_commit": COMMIT}
    assert hub_commit_tags(local, None) == {}
    assert list(quiet_workdir.iterdir()) == []


@pytest.mark.parametrize(
    ("model", "message"),
    [({"source": "org/nope"}, "model.source: the hub has no model 'org/nope'"),
     ({"source": "org/llama", "revision": "v9"}, "model.revision: the hub has no revision 'v9' of org/llama")],
)
def test_a_hub_id_or_revision_the_hub_lacks_is_an_error(
    hub: FakeHub, recipe_dir: Path, quiet_workdir: Path, model: dict[str, str], message: str
) -> None:
    code, output = validate(write(recipe_dir, recipe(model=model)))
    assert code == 2 and message in output, output
    assert list(quiet_workdir.iterdir()) == []


def test_a_teacher_the_hub_lacks_is_an_error(hub: FakeHub, recipe_dir: Path, quiet_workdir: Path) -> None:
    raw = recipe(training={"source": "data/calibration.txt"},
                 stages=[{"name": "kd", "steps": [{"kind": "distill", "teacher": "org/gone"}]}])
    code, output = validate(write(recipe_dir, raw))
    assert code == 2 and "stages.0.steps.0.teacher: the hub has no model 'org/gone'" in output


def test_an_unreachable_hub_is_said_and_fails_strict_validation(
    unreachable_hub: None, recipe_dir: Path, quiet_workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (recipe_dir / "make_models.py").write_text("# writes models/ beside the recipes\n")
    shutil.rmtree(recipe_dir / "models")  # a fresh clone: `models/tiny` is hub-shaped now
    path = write(recipe_dir, recipe("models/tiny"))
    code, output = validate(path)
    assert code == 0, output
    assert "warning model.source: models/tiny: the hub cannot be reached" in output
    assert "the model checks were not done" in output
    assert "scripts beside the recipe that may make it: make_models.py" in output
    assert "write the source as ./models/tiny" in output
    code, output = validate(path, "--strict")
    assert code == 2 and "the model checks were not done" in output
    monkeypatch.setenv("SQUEEZEFLOW_STRICT", "1")  # CI sets it once for every validate
    assert validate(path)[0] == 2
    assert list(quiet_workdir.iterdir()) == []


def test_a_missing_path_never_reaches_the_hub(hub: FakeHub, quiet_workdir: Path) -> None:
    for source in ("./nope", "~/nope", str(quiet_workdir / "nope"), "a/b/c"):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            resolve_source(source)
    assert hub.requests == []


def test_a_stage_that_changes_nothing_is_refused() -> None:
    model, _ = tiny_llama(hidden=32, layers=2, heads=4, intermediate=64)

    def run(*steps: dict[str, object]) -> None:
        configs = [CATALOG.parse(step) for step in steps]
        baseline = stage_baseline(model, configs)
        run_stage_steps(model, [CATALOG.build(config) for config in configs])
        require_change("s", baseline, model)

    with pytest.raises(UnchangedStageError, match=r"steps.0 \(rtn\) selected no module: targets \['nothing\*'\]"):
        run({"kind": "rtn", "targets": ["nothing*"]})
    run({"kind": "magnitude", "sparsity": 0.5})  # changes weights: accepted
    with pytest.raises(UnchangedStageError, match="its steps left every weight as it was"):
        run({"kind": "magnitude", "sparsity": 0.5})  # the same zeros again
    run({"kind": "rtn", "bits": 8})  # same zeros, new stored format: a change


def test_code_version_follows_the_source_and_the_libraries(tmp_path: Path) -> None:
    import torch
    import transformers

    version = code_version()
    assert f"torch-{torch.__version__}" in version
    assert f"transformers-{transformers.__version__}" in version
    assert f"+src.{source_sha256(package_roots())[:16]}" in version

    editable = tmp_path / "editable"
    (editable / "squeezeflow").mkdir(parents=True)
    (editable / "squeezeflow" / "cli.py").write_text("a = 1\n")
    (editable / "compression" / "rtn").mkdir(parents=True)
    (editable / "compression" / "rtn" / "math.py").write_text("b = 2\n")
    roots = [("squeezeflow", editable / "squeezeflow"),
             ("squeezeflow.compression", editable / "compression")]
    first = source_sha256(roots)
    (editable / "compression" / "rtn" / "math.py").write_text("b = 3\n")  # an uncommitted edit
    edited = source_sha256(roots)
    assert edited != first
    (editable / "compression" / "rtn" / "math.py").write_text("b = 2\n")
    assert source_sha256(roots) == first
    (editable / "compression" / "rtn" / "new.py").write_text("")
    assert source_sha256(roots) != first
    (editable / "compression" / "rtn" / "new.py").unlink()

    # a wheel nests the subpackages in squeezeflow/: the same files hash the same
    wheel = tmp_path / "wheel" / "squeezeflow"
    shutil.copytree(editable / "squeezeflow", wheel)
    shutil.copytree(editable / "compression", wheel / "compression")
    assert source_sha256([("squeezeflow", wheel), ("squeezeflow.compression", wheel / "compression")]) == first


def test_code_version_hashes_every_subpackage_setup_py_installs() -> None:
    tree = ast.parse((REPO / "setup.py").read_text())
    declared = next(
        ast.literal_eval(node.value) for node in ast.walk(tree)
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "SUBPACKAGES"
    )
    assert tuple(declared) == SOURCE_PACKAGES
    assert [name for name, _ in package_roots()] == ["squeezeflow", *(f"squeezeflow.{p}" for p in declared)]
