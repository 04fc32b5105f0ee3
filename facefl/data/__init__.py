"""Datasets and preprocessing (NumPy / Pillow only: importing facefl.data does not import torch)."""

from facefl.data.folder import IMAGE_EXTENSIONS, DataError, ImageFolder, load_image
from facefl.data.partition import partition_identities, split_train_test
from facefl.data.preprocess import Preprocessing, preprocessing_for
from facefl.data.synthetic import (
    SYNTHETIC_VERSION,
    make_synthetic_dataset,
    synthetic_identity_images,
    write_image_folder,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "SYNTHETIC_VERSION",
    "DataError",
    "ImageFolder",
    "Preprocessing",
    "load_image",
    "make_synthetic_dataset",
    "partition_identities",
    "preprocessing_for",
    "split_train_test",
    "synthetic_identity_images",
    "write_image_folder",
]

from facefl.data.lfw import (
    ImageList,
    LfwProtocol,
    Pair,
    lfw_image_path,
    pair_arrays,
    pair_folds,
    read_pairs,
    write_synthetic_lfw,
)

__all__ += [
    "ImageList",
    "LfwProtocol",
    "Pair",
    "lfw_image_path",
    "pair_arrays",
    "pair_folds",
    "read_pairs",
    "write_synthetic_lfw",
]
