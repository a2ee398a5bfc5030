"""Weight-free segmenter for phase, quantitative-phase/holographic and brightfield cells.

Steps: flatten the background (subtract a wide Gaussian), measure local
contrast (cells in transmitted light differ from the background in local
variance, whatever their polarity), Otsu-threshold it, fill holes, open, then
split touching cells with a distance-transform-seeded watershed. Sizes are in
um^2 and distances in um so one configuration serves every microscope.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from monitor.protocols import BuildContext
from monitor.records import Cells, Frame
from monitor.segmentation import cells_from_labels


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    background_um: float = Field(30.0, gt=0, description="sigma of the background Gaussian")
    smooth_um: float = Field(1.0, ge=0)
    contrast_um: float = Field(2.0, gt=0, description="window of the local-contrast measure")
    threshold_scale: float = Field(1.0, gt=0, description="multiplies the Otsu threshold")
    min_distance_um: float = Field(6.0, gt=0, description="minimum distance between watershed seeds")
    min_area_um2: float = Field(20.0, ge=0)
    max_area_um2: float = Field(20000.0, gt=0)
    exclude_border: bool = False


class ClassicalSegmenter:
    name = "classical"

    def __init__(self, options: Options):
        self.o = options

    def segment(self, frame: Frame) -> Cells:
        import numpy as np
        from scipy import ndimage as ndi
        from skimage.feature import peak_local_max
        from skimage.filters import gaussian, threshold_otsu
        from skimage.segmentation import watershed

        from monitor.imaging import to_float

        o = self.o
        um = frame.pixel_size_um
        img = to_float(frame.image)
        if img.max() > img.min():
            img = (img - img.min()) / (img.max() - img.min())
        flat = img - gaussian(img, o.background_um / um)
        if o.smooth_um > 0:
            flat = gaussian(flat, o.smooth_um / um)
        # local standard deviation: polarity-free contrast
        w = o.contrast_um / um
        mean = gaussian(flat, w)
        var = np.clip(gaussian(flat * flat, w) - mean * mean, 0, None)
        contrast = np.sqrt(var)
        if contrast.max() <= contrast.min():
            return cells_from_labels(np.zeros(img.shape, np.int32), um, o.min_area_um2, o.max_area_um2, o.exclude_border)
        t = threshold_otsu(contrast) * o.threshold_scale
        fg = ndi.binary_fill_holes(contrast > t)
        fg = ndi.binary_opening(fg, iterations=max(1, int(round(0.5 / um))))
        dist = ndi.distance_transform_edt(fg)
        md = max(1, int(round(o.min_distance_um / um)))
        peaks = peak_local_max(dist, min_distance=md, labels=ndi.label(fg)[0], exclude_border=False)
        markers = np.zeros(img.shape, np.int32)
        markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
        labels = watershed(-dist, markers, mask=fg)
        return cells_from_labels(labels, um, o.min_area_um2, o.max_area_um2, o.exclude_border)


class _Spec:
    name = "classical"
    description = "weight-free: background flattening, local contrast, Otsu, distance watershed"
    Options = Options

    @staticmethod
    def build(options: Options, ctx: BuildContext) -> ClassicalSegmenter:
        return ClassicalSegmenter(options)


PLUGIN = _Spec()
