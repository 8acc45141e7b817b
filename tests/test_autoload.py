"""Installation: the start-up hook is cheap, registers on DomainBed's import, and
the missing-DomainBed message says how to provide it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import PYTHON, requires_domainbed, subprocess_env

from domainbed_fish.locate import ENV_VAR


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, env=subprocess_env(**env), timeout=300)


def test_startup_hook_imports_nothing_heavy():
    out = run_python("import sys, json; print(json.dumps(sorted(sys.modules)))")
    modules = set(json.loads(out.stdout))
    if "domainbed_fish._autoload" not in modules:
        pytest.skip("the package is not installed (pip install -e .), so its start-up .pth is absent")
    assert not {m for m in modules if m.split(".")[0] in {"torch", "numpy", "domainbed"}}
    assert {m for m in modules if m.startswith("domainbed_fish")} == {"domainbed_fish", "domainbed_fish._autoload"}


def test_switch_turns_the_hook_off():
    out = run_python("import sys; print('domainbed_fish._autoload' in sys.modules)", DOMAINBED_FISH_AUTOLOAD="0")
    assert out.stdout.strip() == "False"


@requires_domainbed
def test_domainbed_import_registers_without_any_plugin_import():
    code = "from domainbed import algorithms; print('IDGM' in algorithms.ALGORITHMS, algorithms.Fish.__module__)"
    out = run_python(code)
    if out.stdout.split()[:1] == ["False"] and "domainbed_fish._autoload" not in run_python(
        "import sys; print(list(sys.modules))"
    ).stdout:
        pytest.skip("the package is not installed (pip install -e .), so its start-up .pth is absent")
    assert out.stdout.split() == ["True", "domainbed_fish.algorithms"], out.stderr
    off = run_python(code, DOMAINBED_FISH_AUTOLOAD="0")
    assert off.stdout.split() == ["False", "domainbed.algorithms"], off.stderr


@requires_domainbed
@pytest.mark.parametrize("value", ["false", "OFF", "no", " 0 "])
def test_other_spellings_of_off_turn_the_hook_off(value):
    """DOMAINBED_FISH_AUTOLOAD=false left the plugin registered, silently."""
    code = "from domainbed import algorithms; print('IDGM' in algorithms.ALGORITHMS)"
    if "domainbed_fish._autoload" not in run_python("import sys; print(list(sys.modules))").stdout:
        pytest.skip("the package is not installed (pip install -e .), so its start-up .pth is absent")
    out = run_python(code, DOMAINBED_FISH_AUTOLOAD=value)
    assert (out.stdout.strip(), out.stderr) == ("False", "")


@requires_domainbed
def test_an_unknown_switch_value_leaves_the_hook_on_and_says_so():
    code = "from domainbed import algorithms; print('IDGM' in algorithms.ALGORITHMS)"
    if "domainbed_fish._autoload" not in run_python("import sys; print(list(sys.modules))").stdout:
        pytest.skip("the package is not installed (pip install -e .), so its start-up .pth is absent")
    out = run_python(code, DOMAINBED_FISH_AUTOLOAD="maybe")
    assert out.stdout.strip() == "True"
    assert out.stderr == ("domainbed-fish: DOMAINBED_FISH_AUTOLOAD='maybe' is neither on (1, true, yes, on) nor "
                          "off (0, false, no, off); the plugin stays on. Set DOMAINBED_FISH_AUTOLOAD=0 to switch "
                          "it off.\n")
    assert run_python(code, DOMAINBED_FISH_AUTOLOAD="True").stderr == ""


#: DomainBed's modules the plugin registers into (written out, not read from the hook).
REGISTERED_MODULES = ["domainbed.algorithms", "domainbed.networks", "domainbed.hparams_registry", "domainbed.datasets",
                      "domainbed.command_launchers", "domainbed.lib.fast_data_loader", "domainbed.lib.reporting"]


@requires_domainbed
def test_the_hook_registers_into_every_module_domainbed_imports():
    """Each module is registered into by its own import alone (DomainBed's ``sweep`` imports
    ``command_launchers``, its train script ``fast_data_loader``, ``collect_results`` ``reporting``)."""
    code = ("import importlib, json, sys\n"
            "print(json.dumps({name: getattr(importlib.import_module(name), '_domainbed_fish_registered', False) "
            f"for name in {REGISTERED_MODULES!r}}}))")
    out = run_python(code)
    if "domainbed_fish._autoload" not in run_python("import sys; print(list(sys.modules))").stdout:
        pytest.skip("the package is not installed (pip install -e .), so its start-up .pth is absent")
    assert json.loads(out.stdout) == dict.fromkeys(REGISTERED_MODULES, True), out.stderr
    code = "from domainbed import command_launchers as c; print('local_parallel' in c.REGISTRY, 'submitit' in c.REGISTRY)"
    assert run_python(code).stdout.split() == ["True", "True"]  # what DomainBed's sweep --command_launcher reads


@requires_domainbed
def test_a_hook_installed_after_domainbed_was_imported_registers_at_once():
    """``install()`` run late (DomainBed already imported, e.g. in a notebook) registers into the
    modules already loaded instead of waiting for an import that will not come."""
    code = ("import os\nfrom domainbed import algorithms, datasets, networks\n"
            "assert 'IDGM' not in algorithms.ALGORITHMS\n"
            "os.environ.pop('DOMAINBED_FISH_AUTOLOAD')\nimport domainbed_fish._autoload\n"
            "print('IDGM' in algorithms.ALGORITHMS, 'CdSprites5' in datasets.DATASETS, "
            "type(networks.Featurizer((3, 64, 64), {})).__name__)")
    out = run_python(code, DOMAINBED_FISH_AUTOLOAD="0")
    assert out.stdout.split() == ["True", "True", "CdSpritesCNN"], out.stderr


def test_missing_domainbed_says_how_to_provide_it(tmp_path):
    code = (
        "from domainbed_fish.locate import import_domainbed, DomainBedNotFoundError\n"
        "try:\n    import_domainbed('algorithms')\n"
        "except DomainBedNotFoundError as e:\n    print(e)\n"
    )
    env = subprocess_env(DOMAINBED_FISH_AUTOLOAD="0")
    env.pop(ENV_VAR, None)
    env["PYTHONPATH"] = ""
    out = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    if not out.stdout.strip():
        pytest.skip("DomainBed is importable without DOMAINBED_DIR in this environment")
    assert "DomainBed was not found" in out.stdout and f"{ENV_VAR}=/path/to/DomainBed" in out.stdout

    env[ENV_VAR] = str(tmp_path)
    out = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert "does not point at a DomainBed checkout" in out.stdout
    assert str(tmp_path / "domainbed" / "__init__.py") in out.stdout


def test_startup_line_is_silent_when_the_package_is_gone():
    """A deleted editable checkout must not print a traceback at every Python start-up."""
    from pathlib import Path

    line = (Path(__file__).resolve().parents[1] / "domainbed_fish-autoload.pth").read_text().strip()
    code = f"import os, sys; os.environ.pop('DOMAINBED_FISH_AUTOLOAD'); sys.modules['domainbed_fish'] = None\n{line}\nprint('ok')"
    out = run_python(code, DOMAINBED_FISH_AUTOLOAD="0")
    assert (out.stdout.strip(), out.stderr) == ("ok", "")


# ----------------------------------------------------------------------------- entry points without DomainBed

#: The package's commands of the README, each with the arguments a user types first, and the
#: files or directories it must not leave in the working directory when it cannot run.
ENTRY_POINTS = {
    "reproduction": (["-m", "domainbed_fish.reproduction", "--quick", "--output_dir", "smoke"], "smoke"),
    "sweep": (["-m", "domainbed_fish.sweep", "dry_run", "--preset", "cpu_quick", "--output_dir", "out"], "out"),
    "run_job": (["-m", "domainbed_fish.run_job", "--output_dir", "job", "--algorithm", "Fish",
                 "--dataset", "LinearToy", "--test_envs", "2"], "job"),
}


def stub_checkout_missing_a_dependency(root: Path) -> Path:
    """A stand-in for a DomainBed checkout whose modules import a package that is not
    installed, as DomainBed's import wilds, timm, ... (none of DomainBed's code)."""
    package = root / "domainbed"
    (package / "lib").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "lib" / "__init__.py").write_text("")
    for module in ("algorithms", "datasets", "hparams_registry", "networks", "command_launchers",
                   "lib/fast_data_loader", "lib/reporting"):
        (package / f"{module}.py").write_text("import a_dependency_that_is_not_installed  # noqa\n")
    return root


SITUATIONS = {
    # DOMAINBED_DIR (None: unset, with DomainBed not importable) -> what the message must say
    "unset": (None, ["DomainBed was not found", f"{ENV_VAR}=/path/to/DomainBed"]),
    "wrong_path": ("does-not-exist", ["does not point at a DomainBed checkout", "does-not-exist"]),
    "not_domainbed": (".", ["does not point at a DomainBed checkout", "folder that contains 'domainbed/'"]),
    "dependency_missing": ("stub", ["DomainBed was found", "a_dependency_that_is_not_installed",
                                    "pip install 'domainbed-fish[domainbed]'"]),
}


@pytest.mark.parametrize("situation", sorted(SITUATIONS))
@pytest.mark.parametrize("entry_point", sorted(ENTRY_POINTS))
def test_entry_points_without_domainbed_name_the_problem_and_the_fix(tmp_path, entry_point, situation):
    args, output = ENTRY_POINTS[entry_point]
    where, expected = SITUATIONS[situation]
    work = tmp_path / "work"
    work.mkdir()
    env = subprocess_env()
    env.pop(ENV_VAR, None)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])  # the plugin, never DomainBed
    if where == "stub":
        env[ENV_VAR] = str(stub_checkout_missing_a_dependency(tmp_path / "DomainBed"))
    elif where is not None:
        env[ENV_VAR] = str(tmp_path / where)
    elif subprocess.run([PYTHON, "-c", "import domainbed"], env=env, cwd=work, capture_output=True).returncode == 0:
        pytest.skip("DomainBed is importable without DOMAINBED_DIR in this environment")
    out = subprocess.run([PYTHON, *args], capture_output=True, text=True, env=env, cwd=work, timeout=300)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr, out.stderr
    for phrase in expected:
        assert phrase in out.stderr, out.stderr
    if situation != "dependency_missing":  # found missing before anything is written
        assert not (work / output).exists()


def test_domainbed_dir_with_a_tilde_reaches_domainbeds_own_commands_too(tmp_path):
    """``export DOMAINBED_DIR="~/DomainBed"`` (quoted: the shell leaves the ~) works for the
    plugin's commands, which expand it; the start-up hook, which puts the checkout on the
    path for DomainBed's own ``python -m domainbed.scripts...``, must expand it too."""
    checkout = tmp_path / "home" / "DomainBed"
    (checkout / "domainbed").mkdir(parents=True)
    (checkout / "domainbed" / "__init__.py").write_text("")  # a stand-in checkout, none of DomainBed's code
    env = subprocess_env()
    env.update(HOME=str(tmp_path / "home"), PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    code = "import sys, domainbed; print('domainbed_fish._autoload' in sys.modules, domainbed.__file__)"
    for value in ("~/DomainBed", "DomainBed"):  # relative to the working directory, as the plugin reads it
        env[ENV_VAR] = value
        out = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path / "home",
                             timeout=120)
        if out.stdout.split()[:1] == ["False"]:
            pytest.skip("the package is not installed (pip install -e .), so its start-up .pth is absent")
        assert out.stdout.split() == ["True", str(checkout / "domainbed" / "__init__.py")], out.stderr


def test_domainbeds_own_commands_say_when_domainbed_dir_names_no_checkout(tmp_path):
    """DomainBed's ``python -m domainbed.scripts...`` never reaches the plugin's commands, so
    the start-up hook is what can say that a mistyped ``DOMAINBED_DIR`` is why ``domainbed``
    is missing; a probe for DomainBed must still get ``None``, not an exception."""
    env = subprocess_env()
    env.update(DOMAINBED_DIR=str(tmp_path / "DomainBd"), PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    code = ("import sys, importlib.util\n"
            "print('domainbed_fish._autoload' in sys.modules, importlib.util.find_spec('domainbed'))\n"
            "print(importlib.util.find_spec('domainbed'))")
    probe = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    if probe.stdout.split()[:1] == ["False"]:
        pytest.skip("the package is not installed (pip install -e .), so its start-up .pth is absent")
    if probe.stdout.split()[1:2] != ["None"]:
        pytest.skip("DomainBed is importable without DOMAINBED_DIR in this environment")
    assert probe.stdout.split() == ["True", "None", "None"]
    note = f"domainbed-fish: {ENV_VAR}={str(tmp_path / 'DomainBd')!r} does not point at a DomainBed checkout"
    assert probe.stderr.count(note) == 1, probe.stderr  # once a process, however often it is probed

    out = subprocess.run([PYTHON, "-m", "domainbed.scripts.train", "--dataset", "LinearToy"], capture_output=True,
                         text=True, env=env, cwd=tmp_path, timeout=120)
    assert out.returncode == 1
    assert note in out.stderr and "the folder that contains 'domainbed/'" in out.stderr, out.stderr
    assert "No module named 'domainbed'" in out.stderr  # Python's own error follows, unchanged

    env.pop(ENV_VAR)  # unset: Python's error alone, as without the plugin
    out = subprocess.run([PYTHON, "-m", "domainbed.scripts.train"], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=120)
    assert "domainbed-fish" not in out.stderr and "No module named 'domainbed'" in out.stderr, out.stderr
