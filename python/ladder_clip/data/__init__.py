"""The data layer: datasets (ImageFolder / CoOp split; CoOp's 15 datasets by name: coop_datasets.py;
few-shot, base-to-new), transforms, the loader and the generated shapes; it imports only the base layer.
`ladder_clip.data`'s names, as they were before the layers: `from ladder_clip import data as D; D.load_data(...)`."""
from .coop_datasets import DATASETS, TEST_ONLY, CoopDataset, canonical, load_data, load_dataset, read_dataset
from .datasets import (Item, check_names, few_shot, fewshot_file, fewshot_json, load_imagefolder,
                       load_split_json, parse_fewshot, readable, save_fewshot, subsample)
from .loader import ImageDataset, loader
from .transforms import Augment, Preprocess

__all__ = ["Augment", "CoopDataset", "DATASETS", "ImageDataset", "Item", "Preprocess", "TEST_ONLY", "canonical",
           "check_names", "few_shot", "fewshot_file", "fewshot_json", "load_data", "load_dataset", "load_imagefolder",
           "load_split_json", "loader", "parse_fewshot", "read_dataset", "readable", "save_fewshot", "subsample"]
