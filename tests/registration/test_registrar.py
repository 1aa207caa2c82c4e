"""The registration engine: accuracy, statuses, dtypes, bad input."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from numpy.testing import assert_allclose

from stagelock import Registrar, ShiftEstimate, Status, estimate_shifts, iter_estimates
from stagelock.sim import CameraNoise, fourier_shift, sample_image

SHAPE = (256, 256)


@pytest.fixture(scope="module")
def base() -> np.ndarray:
    return sample_image(SHAPE)


def as_dtype(image: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "uint8":
        return np.clip(image * 200 + 20, 0, 255).astype(np.uint8)
    if dtype == "uint16":
        return np.clip(image * 3000 + 100, 0, 65535).astype(np.uint16)
    return image.astype(dtype)


@dataclass(frozen=True)
class Case:
    name: str
    dx: float
    dy: float
    max_shift_px: float = 20.0


CASES = [
    Case("integer", 3.0, -2.0),
    Case("subpixel", 0.37, -0.81),
    Case("negative-subpixel", -4.63, -1.26),
    Case("positive-subpixel", 7.25, 5.5),
    Case("near-capture-range", -18.4, 17.7),
    Case("large-range", 41.3, -37.9, max_shift_px=50.0),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32", "float64"])
def test_recovers_known_shift(base: np.ndarray, case: Case, dtype: str) -> None:
    ref = as_dtype(base, dtype)
    frame = as_dtype(fourier_shift(base, case.dx, case.dy), dtype)
    est = Registrar(ref, max_shift_px=case.max_shift_px).measure(frame)
    assert est.status is Status.OK
    assert_allclose([est.dx_px, est.dy_px], [case.dx, case.dy], atol=0.05)
    assert 0.5 < est.confidence <= 1.0


@pytest.mark.parametrize("roi", [(10, 140, 100, 100), (150, 20, 90, 120)])
def test_roi_away_from_origin(base: np.ndarray, roi: tuple[int, int, int, int]) -> None:
    reg = Registrar(base, roi=roi, max_shift_px=15)
    x, y, w, h = roi
    for rx, ry, size in reg.regions:
        assert x <= rx and rx + size <= x + w and y <= ry and ry + size <= y + h
    est = reg.measure(fourier_shift(base, -6.3, 4.45))
    assert_allclose([est.dx_px, est.dy_px], [-6.3, 4.45], atol=0.05)


def test_texture_at_the_frame_edge_still_gives_usable_regions(
    base: np.ndarray,
) -> None:
    # the sample fills only a 48 px band along the right and bottom edges:
    # regions cut flush with the edge could never be resampled (the kernel
    # reads past it), so all of them would drop out at any drift
    edged = np.zeros_like(base)
    edged[:, -48:] = base[:, -48:]
    edged[-48:, :] = base[-48:, :]
    reg = Registrar(edged, max_shift_px=20)
    for x, y, size in reg.regions:
        assert min(x, y) >= 5 and max(x, y) + size <= SHAPE[0] - 5
    rng = np.random.default_rng(8)
    for dx, dy in [(2.3, 1.7), (4.6, 3.2), (-3.1, 4.4)]:
        frame = fourier_shift(edged, dx, dy) + rng.normal(0, 0.01, SHAPE)
        est = reg.measure(frame)
        assert est.ok and est.n_regions >= 0.7 * len(reg.regions), est
        assert_allclose([est.dx_px, est.dy_px], [dx, dy], atol=0.05)


def test_noisy_movie_tracking_accuracy(base: np.ndarray) -> None:
    rng = np.random.default_rng(3)
    truth = np.cumsum(rng.normal(0.05, 0.3, size=(30, 2)), axis=0)
    truth[0] = 0
    noise = CameraNoise(peak_photons=500)
    movie = np.stack([noise.expose(fourier_shift(base, *t), rng) for t in truth])
    est = estimate_shifts(movie, max_shift_px=20)
    assert est[0].tolist() == [0.0, 0.0]  # frame 0 exactly zero: no first-frame jump
    err = np.hypot(*(est - truth).T)
    assert np.sqrt(np.mean(err**2)) < 0.03
    assert err.max() < 0.08


@pytest.mark.parametrize("coverage", [None, 1.0])
def test_sigma_is_the_error_actually_made(
    base: np.ndarray, coverage: float | None
) -> None:
    # a faint sample against noisy references: each reference's noise adds an
    # error common to its frames, and the reported sigma must include it; one
    # reference is one draw of that error, so the check pools six of them
    noise = CameraNoise(peak_photons=100)
    z = []
    for seed in range(6):
        rng = np.random.default_rng(seed)
        truth = np.cumsum(rng.normal(0.05, 0.3, size=(12, 2)), axis=0)
        truth[0] = 0
        movie = [noise.expose(fourier_shift(base, *t), rng) for t in truth]
        reg = Registrar(movie[0], max_shift_px=20, coverage=coverage)
        for frame, (dx, dy) in zip(movie[1:], truth[1:], strict=True):
            est = reg.measure(frame)
            assert est.ok
            error = np.hypot(est.dx_px - dx, est.dy_px - dy)
            z.append(error / np.sqrt(2) / est.sigma_px)
    # |error| / (sqrt(2) sigma) of a 2-D Gaussian: median 0.83, 90 % below 1.52
    assert 0.55 < np.median(z) < 1.2, np.median(z)
    assert np.percentile(z, 90) < 2.2


def test_no_pixel_locking_bias(base: np.ndarray) -> None:
    fractions = np.linspace(0.0, 1.0, 21)
    truth = np.array([(2 + f, -3 + f) for f in fractions])
    movie = np.stack([base] + [fourier_shift(base, *t) for t in truth])
    est = estimate_shifts(movie, max_shift_px=10)[1:]
    bias = np.abs(est - truth)
    assert bias.max() <= 0.01, f"pixel locking: max bias {bias.max():.4f} px"


def test_transient_debris_is_outvoted(base: np.ndarray) -> None:
    frame = fourier_shift(base, 2.3, -1.7)
    reg = Registrar(base, max_shift_px=10)
    x, y, size = reg.regions[0]
    rows, cols = np.mgrid[: SHAPE[0], : SHAPE[1]]
    cy, cx = y + size / 2, x + size / 2
    blob = 2.0 * np.exp(-((rows - cy) ** 2 + (cols - cx) ** 2) / (2 * 12.0**2))
    est = reg.measure(frame + blob.astype(np.float32))
    assert est.status is Status.OK
    assert_allclose([est.dx_px, est.dy_px], [2.3, -1.7], atol=0.05)


def test_bleaching_does_not_bias(base: np.ndarray) -> None:
    reg = Registrar(base * 3000 + 100, max_shift_px=10)
    est = reg.measure(fourier_shift(base, -1.4, 0.6) * 1200 + 100)
    assert_allclose([est.dx_px, est.dy_px], [-1.4, 0.6], atol=0.05)


def test_caller_arrays_untouched(base: np.ndarray) -> None:
    ref = as_dtype(base, "uint16")
    frame = as_dtype(fourier_shift(base, 1.5, 2.5), "uint16")
    ref_copy, frame_copy = ref.copy(), frame.copy()
    reg = Registrar(ref)
    reg.measure(frame)
    ref[:] = 0  # later changes to the caller's reference have no effect
    assert_allclose(reg.measure(frame_copy).dx_px, 1.5, atol=0.05)
    assert np.array_equal(frame, frame_copy)
    del ref_copy


@pytest.mark.parametrize(
    ("frame_of", "status"),
    [
        (lambda b: np.full(SHAPE, 1234, np.uint16), Status.BLANK),
        (lambda b: np.full(SHAPE, 65535, np.uint16), Status.BLANK),
        (lambda b: np.where(b > 0.2, 65535, 1000).astype(np.uint16), Status.SATURATED),
    ],
    ids=["blank", "all-saturated", "saturated"],
)
def test_untrusted_frames_get_a_status_not_a_number(
    base: np.ndarray, frame_of: object, status: Status
) -> None:
    reg = Registrar(as_dtype(base, "uint16"))
    est = reg.measure(frame_of(base))  # type: ignore[operator]
    assert est.status is status
    assert np.isnan(est.dx_px) and np.isnan(est.dy_px)
    assert not est.status.has_shift


def test_featureless_frame_is_not_ok(base: np.ndarray) -> None:
    rng = np.random.default_rng(0)
    reg = Registrar(as_dtype(base, "uint16"))
    noise = rng.normal(1000, 30, SHAPE).astype(np.uint16)
    est = reg.measure(noise)
    assert est.status is not Status.OK


def test_shift_beyond_capture_range_is_reported(base: np.ndarray) -> None:
    big = sample_image((384, 384))
    reg = Registrar(big[64:320, 64:320], max_shift_px=8)
    est = reg.measure(big[64 + 30 : 320 + 30, 64 - 25 : 320 - 25])
    assert est.status is not Status.OK
    assert np.isnan(est.dx_px)


def test_keyframe_strategy_follows_a_changing_sample(base: np.ndarray) -> None:
    other = np.ascontiguousarray(np.rot90(base))
    truth = [(0.2 * k, -0.15 * k) for k in range(40)]
    frames = []
    for k, (dx, dy) in enumerate(truth):
        mix = k / 39  # the sample changes completely over the movie
        frames.append(
            (1 - mix) * fourier_shift(base, dx, dy) + mix * fourier_shift(other, dx, dy)
        )
    fixed = list(iter_estimates(frames, max_shift_px=15))
    keyed = estimate_shifts(np.stack(frames), max_shift_px=15, reference="keyframe")
    # a cross-fade biases any matcher a little; chained key frames keep the whole
    # run measurable and within half a pixel
    err = np.hypot(*(keyed - np.array(truth)).T)
    assert np.all(err < 0.5), err.max()
    # the fixed reference cannot follow a sample that has become another one
    assert any(e.status is not Status.OK for e in fixed[-5:])


def test_mean_reference(base: np.ndarray) -> None:
    rng = np.random.default_rng(5)
    noise = CameraNoise(peak_photons=200)
    frames = [noise.expose(base, rng) for _ in range(5)]
    frames += [noise.expose(fourier_shift(base, 3.2, -1.1), rng) for _ in range(3)]
    est = list(iter_estimates(frames, reference="mean", n_mean=5, max_shift_px=10))
    assert len(est) == 8
    assert_allclose([[e.dx_px, e.dy_px] for e in est[5:]], [[3.2, -1.1]] * 3, atol=0.05)


def test_iter_estimates_streams_shift_estimates(base: np.ndarray) -> None:
    frames = (fourier_shift(base, k * 0.5, 0.0) for k in range(4))  # a generator
    est = list(iter_estimates(frames, max_shift_px=10))
    assert all(isinstance(e, ShiftEstimate) for e in est)
    assert_allclose([e.dx for e in est], [0, 0.5, 1.0, 1.5], atol=0.05)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda b: Registrar(np.stack([b, b])), "2-D"),
        (lambda b: Registrar(b).measure(b[:100]), "differs from the reference shape"),
        (lambda b: Registrar(b, roi=(200, 200, 100, 100)), "roi"),
        (lambda b: Registrar(b.astype(np.complex64)), "dtype"),
        (lambda b: Registrar(b, max_shift_px=0), "max_shift_px"),
        (lambda b: Registrar(np.zeros(SHAPE)), "no texture"),
        (lambda b: Registrar(b, smooth_sigma_px=-1), "smooth_sigma_px"),
        (lambda b: estimate_shifts(b), r"\(T, H, W\)"),
        (lambda b: estimate_shifts(np.stack([b, b]), reference="median"), "reference"),
    ],
    ids=[
        "3d",
        "shape",
        "roi-outside",
        "complex",
        "max-shift",
        "flat",
        "sigma",
        "2d-stack",
        "ref",
    ],
)
def test_bad_input_raises_clear_value_error(
    base: np.ndarray, call: object, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        call(base)  # type: ignore[operator]


def test_set_reference_restarts_from_new_image(base: np.ndarray) -> None:
    reg = Registrar(base, max_shift_px=10)
    moved = fourier_shift(base, 4.0, 1.0)
    reg.set_reference(moved)
    assert_allclose(reg.measure(moved).dx_px, 0.0, atol=0.01)
    assert_allclose(reg.measure(base).dx_px, -4.0, atol=0.05)


def lattice(shape: tuple[int, int], period_px: float = 14.0) -> np.ndarray:
    """Hexagonal lattice of spots with a few vacancies (a periodic sample)."""
    rng = np.random.default_rng(11)
    rows, cols = np.mgrid[: shape[0], : shape[1]].astype(np.float64)
    image = np.zeros(shape)
    for i, y in enumerate(
        np.arange(-period_px, shape[0] + period_px, period_px * 0.866)
    ):
        for x in np.arange(-period_px, shape[1] + period_px, period_px):
            if rng.random() < 0.08:
                continue
            x0 = x + (period_px / 2 if i % 2 else 0.0)
            image += np.exp(-((rows - y) ** 2 + (cols - x0) ** 2) / (2 * 2.0**2))
    return image.astype(np.float32)


def test_periodic_sample_picks_the_nearest_lattice_site() -> None:
    base = lattice(SHAPE)
    rng = np.random.default_rng(2)
    noise = CameraNoise(peak_photons=500)
    ref = noise.expose(base, rng)
    reg = Registrar(ref, max_shift_px=30)
    # the reference against itself: zero, not a neighbouring lattice site
    est0 = reg.measure(ref)
    assert_allclose([est0.dx_px, est0.dy_px], [0, 0], atol=0.02)
    truth = [(0.4 * k, -0.3 * k) for k in range(1, 12)]
    for dx, dy in truth:
        est = reg.measure(noise.expose(fourier_shift(base, dx, dy), rng))
        assert_allclose([est.dx_px, est.dy_px], [dx, dy], atol=0.05)
