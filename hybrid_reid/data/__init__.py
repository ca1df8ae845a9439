"""Data: data sets (registry), the synthetic generator, paired transforms, the PK sampler, loaders."""
from . import custom  # noqa: F401 - registers the folder and manifest data sets
from .datasets import DATASETS, DataError, ReIDData, Sample, canonical_modality, load_data
from .loader import MultiModalDataset, PKSampler, SampleKey, build_test_loader, build_train_loader
from .synth import SynthSpec, generate
from .transforms import PairedTransform, SampleRNG

__all__ = ["DATASETS", "DataError", "MultiModalDataset", "PKSampler", "PairedTransform", "ReIDData", "Sample",
           "SampleKey", "SampleRNG", "SynthSpec", "build_test_loader", "build_train_loader", "canonical_modality",
           "generate", "load_data"]
