"""Gait silhouette data: OpenGait pickle trees, P x K sampling, batches, PNG import, synthetic.

* :func:`load_pickle` / :func:`save_pickle`: one OpenGait pickle, loaded safely.
* :class:`OpenGaitDataset`: a pickle tree in memory (bit-packed), subject selection.
* :class:`TripletSampler`: P identities x K sequences per batch, resumable, DDP-sharded.
* :func:`make_train_batch`, :func:`iter_test_batches`: model inputs.
* :mod:`qgait.data.import_png`: raw silhouette PNG trees -> the pickle tree.
* :mod:`qgait.data.synthetic`: a procedural walking-silhouette generator with the same layout.
"""
from qgait.data.batch import iter_test_batches, make_train_batch  # noqa: F401
from qgait.data.dataset import (CROP, HEIGHT, WIDTH, OpenGaitDataset, SeqInfo,  # noqa: F401
                                select_subjects)
from qgait.data.pickle_io import DataError, load_pickle, save_pickle  # noqa: F401
from qgait.data.sampler import TripletSampler  # noqa: F401
# the submodule, not its function of the same name: from qgait.data.import_png import import_png
from qgait.data import import_png  # noqa: F401,E402
from qgait.data import synthetic  # noqa: F401,E402
from qgait.data.preprocess import normalise_frame, normalise_frames  # noqa: F401,E402
