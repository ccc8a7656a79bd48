"""On-device augmentation for GLARE: two global views with their crop geometry, patch distortion, and
attention-guided regions. Everything is batched and runs on the tensors' device."""

from glare.augment.geometry import image_to_view, map_patch_mask, match_patches, patch_centres, view_to_image
from glare.augment.patch import blur_patches, distort_patches
from glare.augment.regions import region_queries, sample_regions
from glare.augment.views import ViewPair, Views, box_overlap, make_views

__all__ = [
    "ViewPair",
    "Views",
    "blur_patches",
    "box_overlap",
    "distort_patches",
    "image_to_view",
    "make_views",
    "map_patch_mask",
    "match_patches",
    "patch_centres",
    "region_queries",
    "sample_regions",
    "view_to_image",
]
