"""Data layer: data sets held as uint8 tensors, read from their standard file formats (searched in
data_dir, $EENN_DATA_DIR, the user cache, then system folders; optionally downloaded), split into
train/val/test, and batched on-device by ``TensorLoader``.

    splits = load_dataset("fashion_mnist", val_fraction=0.1, seed=0)
    loader = TensorLoader(splits.train, 128, shuffle=True, input_spec=InputSpec.from_info(splits.info))
"""
from .core import DataSplits, DatasetInfo, TensorDataset
from .datasets import TrainTest, list_datasets, load_dataset, register_dataset
from .errors import DatasetCorruptError, DatasetNotFoundError
from .loader import TensorLoader
from .spec import InputSpec, normalize

__all__ = ["DataSplits", "DatasetCorruptError", "DatasetInfo", "DatasetNotFoundError", "InputSpec", "TensorDataset",
           "TensorLoader", "TrainTest", "list_datasets", "load_dataset", "normalize", "register_dataset"]
