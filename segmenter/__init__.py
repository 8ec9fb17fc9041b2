"""segmenter: 3D lesion segmentation for MRI."""

__version__ = "0.1.0"
