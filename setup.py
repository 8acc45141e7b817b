"""domainbed-fish: Fish and exact IDGM for DomainBed, installed as a plugin.

Besides the package, the install puts ``domainbed_fish-autoload.pth`` into
site-packages.  Python runs its one line at start-up; it installs a tiny import
hook (``domainbed_fish._autoload``) that registers the plugin when DomainBed's
modules are imported, so DomainBed's unmodified scripts know Fish and IDGM.
"""

from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).parent
PTH = "domainbed_fish-autoload.pth"


class build_py_with_pth(build_py):
    """Ship the start-up ``.pth`` at the root of the wheel, i.e. in site-packages.

    A regular build puts it in ``build_lib``, which becomes the wheel's root.  An
    editable (PEP 660) build keeps modules in the source tree, so the file goes
    straight into the unpacked editable wheel (``install_lib``) instead.
    """

    def _pth_target(self) -> Path:
        if getattr(self, "editable_mode", False):
            return Path(self.get_finalized_command("install").install_lib) / PTH
        return Path(self.build_lib) / PTH

    def run(self):
        super().run()
        self.copy_file(str(HERE / PTH), str(self._pth_target()), preserve_mode=0)

    def get_outputs(self, include_bytecode=True):
        outputs = super().get_outputs(include_bytecode)
        if not getattr(self, "editable_mode", False):
            outputs.append(str(self._pth_target()))
        return outputs


setup(
    name="domainbed-fish",
    version="0.1.0",
    description="Fish and exact IDGM (Gradient Matching for Domain Generalization) as a DomainBed plugin",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["domainbed_fish", "domainbed_fish.*"]),
    package_data={"domainbed_fish": ["presets/*.json"]},
    install_requires=["torch>=2.1", "torchvision", "numpy", "tqdm"],
    extras_require={
        # DomainBed's own requirements (DomainBed itself is cloned, see README), and
        # matplotlib for the reproduction's figures.
        "domainbed": ["wilds", "timm", "tqdm", "parameterized", "matplotlib"],
        # Slurm through submitit (the `submitit` launcher); plots of the sweep report.
        "cluster": ["submitit"],
        "plots": ["matplotlib"],
        "test": ["pytest", "parameterized", "ruff", "submitit", "matplotlib"],
    },
    entry_points={"console_scripts": ["domainbed-fish-sweep=domainbed_fish.sweep:main"]},
    cmdclass={"build_py": build_py_with_pth},
)
