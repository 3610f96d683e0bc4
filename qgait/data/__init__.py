"""Gait silhouette data: OpenGait pickle trees, P x K sampling, batches, PNG import, synthetic.

* :func:`load_pickle` / :func:`save_pickle`: one OpenGait pickle, loaded safely.
* :class:`OpenGaitDataset`: a pickle tree in memory (bit-packed), subject selection.
* :class:`TripletSampler`: P identities x K sequences per batch, resumable, DDP-sharded.
* :func:`make_train_batch`, :func:`iter_test_batches`: model inputs.
* :mod:`qgait.data.import_png`: raw silhouette PNG trees -> the pickle tree.
* :mod:`qgait.data.synthetic`: a procedural walking-silhouette generator with the same layout.
* :class:`SilhouetteAugment`: per-sequence flip / warp / erasing for training.
* :func:`gei_rank1`: a training-free baseline (GEI + nearest neighbour, CASIA-B protocol).
"""
from qgait.data import import_png, synthetic
from qgait.data.augment import SilhouetteAugment
from qgait.data.baseline import gei_rank1, geis
from qgait.data.batch import iter_test_batches, make_train_batch
from qgait.data.dataset import CROP, HEIGHT, WIDTH, OpenGaitDataset, SeqInfo, select_subjects
from qgait.data.pickle_io import DataError, load_pickle, save_pickle
from qgait.data.preprocess import normalise_frame, normalise_frames
from qgait.data.sampler import TripletSampler

# import_png is the submodule (its function: from qgait.data.import_png import import_png)
__all__ = [
    "CROP", "HEIGHT", "WIDTH", "DataError", "OpenGaitDataset", "SeqInfo", "SilhouetteAugment",
    "TripletSampler",
    "gei_rank1", "geis", "import_png", "iter_test_batches", "load_pickle", "make_train_batch",
    "normalise_frame", "normalise_frames", "save_pickle", "select_subjects", "synthetic",
]
