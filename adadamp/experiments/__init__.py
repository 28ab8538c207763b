"""The paper's experiments: ``adadamp compare``, ``adadamp train`` and the synthetic one.

They need the ``experiments`` extra (matplotlib for the figures, mnist1d for
its data set): ``pip install "adadamp[experiments]"``. Without it, importing
this package raises :class:`~adadamp.exceptions.MissingExtraError` at once,
rather than a run failing when it first draws or loads MNIST-1D.

- ``schedules``: the Smith et al. schedules (:class:`~.schedules.SmithSchedule`);
- ``data``, ``models``: offline data sets and small models;
- ``augment``: training data augmented afresh per read (``compare --augment``);
- ``runtime``: what the runners share (backends, threads, Dask client, test scoring);
- ``results``: the records the runners fill in and the plots read;
- ``plots``: the figures;
- ``compare``, ``train``, ``synthetic``: the runners and their command lines.
"""

import sys
from importlib.util import find_spec

from ..exceptions import MissingExtraError

#: The packages of the ``experiments`` extra (pyproject.toml).
EXTRA_PACKAGES = ("matplotlib", "mnist1d")


def _installed(name: str) -> bool:
    # A None entry in sys.modules is Python's mark of a module that must not
    # be imported; find_spec would only look at the disk.
    if name in sys.modules:
        return sys.modules[name] is not None
    return find_spec(name) is not None


def _check_extra() -> None:
    missing = [name for name in EXTRA_PACKAGES if not _installed(name)]
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise MissingExtraError(
            f"{' and '.join(missing)} {verb} not installed: adadamp's experiments "
            "(adadamp compare, adadamp train, python -m adadamp.experiments.synthetic) "
            'need the "experiments" extra. Install it with: pip install "adadamp[experiments]"',
            # The package that failed to import: with it, `python -m` prints
            # the message on one line instead of a traceback.
            name=__name__,
        )


_check_extra()
