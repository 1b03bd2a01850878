"""Run at interpreter start by lerobot_policy_sensorvla.pth: lets lerobot 0.4.4 import beside transformers >= 5.

lerobot 0.4.4 pins transformers < 5 for its own VLA policies (groot, pi0, pi05, smolvla, xvla); with transformers 5
installed (sensorvla needs it) `import lerobot.policies` fails in groot's config dataclass. When transformers >= 5
is installed, this marks transformers unavailable to lerobot (`lerobot.utils.import_utils._transformers_available`)
as that module loads, so lerobot skips those policies (they cannot run on transformers 5 anyway) and everything else,
sensorvla's plugin included, imports. Nothing is imported here unless lerobot is; transformers itself stays usable.
"""

import importlib.abc
import importlib.metadata
import importlib.util
import sys

TARGET = "lerobot.utils.import_utils"


def _transformers_major() -> int:
    try:
        return int(importlib.metadata.version("transformers").split(".")[0])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return 0


class _MarkTransformersUnavailable(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the loader of lerobot.utils.import_utils to set the flag after it runs."""

    def find_spec(self, name, path=None, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            module._transformers_available = False

        spec.loader.exec_module = exec_module
        return spec


if TARGET not in sys.modules and _transformers_major() >= 5:
    sys.meta_path.insert(0, _MarkTransformersUnavailable())
