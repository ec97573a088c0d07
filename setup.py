"""The configs live at the repository's top (conf/); a built package carries a copy inside it
(d2dmoe/conf), so a plain `pip install .` has them. Everything else is in pyproject.toml."""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithConfigs(build_py):
    def run(self):
        super().run()
        shutil.copytree(Path(__file__).parent / "conf", Path(self.build_lib) / "d2dmoe" / "conf",
                        ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)


setup(cmdclass={"build_py": BuildWithConfigs})
