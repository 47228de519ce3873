"""Data layer: data sets held as uint8 tensors, read from their standard file formats (searched in
data_dir, $EENN_DATA_DIR, the user cache, then system folders; optionally downloaded), split into
train/val/test, and batched on-device by ``TensorLoader``; or one's own tensors (pixels, token ids
or float features) made into the same train/val/test bundle by ``from_tensors``.

    splits = load_dataset("fashion_mnist", val_fraction=0.1, seed=0)
    loader = TensorLoader(splits.train, 128, shuffle=True, input_spec=InputSpec.from_info(splits.info))
    mine = from_tensors(train=(ids, labels), val=(val_ids, val_labels))
"""
from .core import DataSplits, DatasetInfo, TensorDataset
from .datasets import TrainTest, list_datasets, load_dataset, register_dataset
from .errors import DatasetCorruptError, DatasetNotFoundError
from .loader import TensorLoader
from .spec import InputSpec, normalize
from .tensors import from_tensors

__all__ = ["DataSplits", "DatasetCorruptError", "DatasetInfo", "DatasetNotFoundError", "InputSpec", "TensorDataset",
           "TensorLoader", "TrainTest", "from_tensors", "list_datasets", "load_dataset", "normalize", "register_dataset"]
