"""Tests for the installation: requirements.txt, pyproject.toml and what they promise.

README's first command, `pip install -r requirements.txt`, must leave every listed package
installed at a version the file allows, this project installed (`import captioning` from any
folder), and Keras able to export a model to OpenVINO (Keras' OpenVINO backend needs scipy).
pyproject.toml's `all` extra must list exactly requirements.txt's packages. Under CI
(CI=true), a missing OpenVINO is a failure, not a skip.
"""
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from captioning.utils import PipelineError, require

REPO = Path(__file__).resolve().parents[1]


def in_ci():
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def requirements_txt():
    """requirements.txt's package lines as Requirements (comments, options and `-e .` left out)."""
    text = (REPO / "requirements.txt").read_text()
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return [Requirement(line) for line in lines if line and not line.startswith("-")]


def key(req):
    return canonicalize_name(req.name), str(req.specifier), tuple(sorted(req.extras)), str(req.marker)


# ---- require ----------------------------------------------------------------------------------
def test_require_returns_the_module():
    import json
    assert require("json", "web", "serve.py") is json


def test_require_names_the_extra_in_one_line():
    with pytest.raises(PipelineError) as err:
        require("no_such_module_xyz.sub", "video", "caption_video.py")
    assert str(err.value) == ("caption_video.py needs the 'no_such_module_xyz.sub' package: pip install "
                              "'flickr8k-captioning[video]' (or pip install -r requirements.txt)")


def test_require_passes_on_what_an_installed_package_misses(tmp_path, monkeypatch):
    # the package is there, a module it imports is not: the real error, not "install the extra"
    (tmp_path / "half_installed_pkg.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError) as err:
        require("half_installed_pkg", "web", "serve.py")
    assert err.value.name == "no_such_dependency_xyz"


# ---- requirements.txt and pyproject.toml ------------------------------------------------------
def test_every_requirement_is_installed_at_an_allowed_version():
    reqs = requirements_txt()
    assert len(reqs) >= 20
    wrong = []
    for req in reqs:
        try:
            version = importlib.metadata.distribution(req.name).version
        except importlib.metadata.PackageNotFoundError:
            wrong.append(f"{req.name}: not installed")
            continue
        if not req.specifier.contains(version, prereleases=True):
            wrong.append(f"{req.name} {version}: requirements.txt asks for {req.specifier}")
    assert not wrong, "pip install -r requirements.txt: " + "; ".join(wrong)


def test_the_project_itself_imports_from_any_folder(tmp_path):
    # requirements.txt's last line, `-e .`: this checkout's package, without the repo on sys.path
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", "import captioning; print(captioning.__file__)"],
                         cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, f"pip install -r requirements.txt (its `-e .` line): {out.stderr.strip()}"
    assert Path(out.stdout.strip()).resolve() == REPO / "captioning" / "__init__.py"


def test_pyproject_all_extra_is_requirements_txt():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11+")
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    project = pyproject["project"]
    extras = {name: {key(Requirement(r)) for r in reqs}
              for name, reqs in project["optional-dependencies"].items()}
    assert extras["all"] == {key(r) for r in requirements_txt()}
    core = {key(Requirement(r)) for r in project["dependencies"]}
    assert extras["all"] == core.union(*(v for name, v in extras.items() if name != "all"))
    # the web page's files are package data wherever they sit under captioning/
    patterns = pyproject["tool"]["setuptools"]["package-data"]["captioning"]
    matched = {p for pattern in patterns for p in (REPO / "captioning").glob(pattern)}
    assert any(p.name == "index.html" for p in matched)


# ---- Keras to OpenVINO ------------------------------------------------------------------------
def test_keras_model_exports_to_openvino_and_gives_kerass_outputs(tmp_path):
    try:
        import openvino as ov
    except ImportError as exc:
        if in_ci():
            pytest.fail(f"openvino is not installed ({exc}); CI installs requirements.txt")
        pytest.skip(f"openvino is not installed ({exc})")
    import keras
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3, activation="relu"),
                              keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(5)])
    path = tmp_path / "model.xml"
    model.export(str(path), format="openvino", verbose=False)
    core = ov.Core()
    # f32: on CPUs with bf16 instructions OpenVINO would otherwise compute in bf16 (~1e-2 off)
    compiled = core.compile_model(core.read_model(str(path)), "CPU",
                                  {"INFERENCE_PRECISION_HINT": "f32"})
    x = np.random.default_rng(0).standard_normal((3, 8, 8, 3)).astype("float32")
    got = compiled(x)[0]
    want = model.predict(x, verbose=0)
    assert got.shape == want.shape == (3, 5)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_a_script_without_its_extra_says_which_to_install_in_one_line(monkeypatch):
    from captioning.utils import check_installed
    monkeypatch.setitem(sys.modules, "av", None)      # what an uninstalled package looks like
    with pytest.raises(SystemExit) as stop:
        check_installed("caption_video.py", "video", "av")
    assert str(stop.value) == ("error: caption_video.py needs the 'av' package: pip install "
                               "'flickr8k-captioning[video]' (or pip install -r requirements.txt)")
    check_installed("caption_video.py", "video", "json")   # installed: nothing happens
