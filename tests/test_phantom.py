"""Tests of the synthetic head-CT generator: anatomy, bleeds, ground truth, writing, realism."""

import hashlib
import subprocess

import numpy as np
import pytest
from scipy import ndimage

import dcm2niix_tool
from uem_ich_jax import CQ500_LABELS, MASK_CLASS_IDS, SLICE_LABELS, SUBTYPES
from uem_ich_jax.ct.dicom import read_dicom_series
from uem_ich_jax.ct.nifti import read_nifti, read_nifti_pair
from uem_ich_jax.errors import InputError
from uem_ich_jax.phantom import PhantomScan, findings, generate, generate_scan, write_dicom, write_nifti

# A small grid with room for every subtype, so most tests stay fast.
SMALL = dict(shape=(16, 128, 128), spacing_mm=(8.0, 1.8, 1.8))
# Acute blood density (HU) every mask voxel must have.
BLOOD_HU = (50.0, 90.0)


@pytest.fixture(scope="module")
def scans_per_subtype() -> dict[str, PhantomScan]:
  scans = {"normal": generate_scan(11, subtypes=(), **SMALL)}
  for offset, name in enumerate(SUBTYPES):
    scans[name] = generate_scan(20 + offset, subtypes=(name,), **SMALL)
  scans["all"] = generate_scan(40, subtypes=SUBTYPES, **SMALL)
  return scans


def test_generate_scan_types_and_shapes():
  scan = generate_scan(0, (8, 64, 96), spacing_mm=(6.0, 2.5, 2.0), subtypes=("subdural",))
  assert scan.volume.hu.shape == (8, 64, 96)
  assert scan.volume.hu.dtype == np.float32
  assert scan.mask.shape == (8, 64, 96)
  assert scan.mask.dtype == np.uint8
  assert scan.slice_labels.shape == (8, len(SLICE_LABELS))
  assert scan.slice_labels.dtype == np.uint8
  assert set(SLICE_LABELS) <= set(scan.scan_labels)
  assert len(scan.boxes) == 8
  assert len(scan.box_classes) == 8
  assert all(b.dtype == np.float32 and b.shape[1:] == (4,) for b in scan.boxes)
  assert all(c.dtype == np.int32 for c in scan.box_classes)
  assert set(scan.hematoma_ml) == set(SUBTYPES)
  assert scan.volume.spacing == (6.0, 2.5, 2.0)


def test_generate_scan_is_reproducible():
  first = generate_scan(5, **SMALL)
  second = generate_scan(5, **SMALL)
  other = generate_scan(6, **SMALL)
  np.testing.assert_array_equal(first.volume.hu, second.volume.hu)
  np.testing.assert_array_equal(first.mask, second.mask)
  assert first.scan_labels == second.scan_labels
  assert first.scan_id == second.scan_id
  assert first.patient_id == second.patient_id
  assert not np.array_equal(first.volume.hu, other.volume.hu)
  assert first.scan_id != other.scan_id


def test_ids_default_from_seed_and_can_be_given():
  scan = generate_scan(5, patient_id="P1", scan_id="S1", **SMALL)
  assert (scan.patient_id, scan.scan_id) == ("P1", "S1")
  assert scan.volume.provenance.patient_id == "P1"


def test_same_patient_shares_anatomy():
  # Noise-free normal scans in thin slices (so that the seed's slice offset
  # barely matters): the same patient gives the same bone, CSF and head
  # volumes whatever the seed, another patient does not.
  def tissue_counts(seed, patient_id):
    scan = generate_scan(
        seed, (90, 80, 80), spacing_mm=(2.0, 3.0, 3.0), subtypes=(), patient_id=patient_id,
        noise_hu=0.0,
    )
    hu = scan.volume.hu
    return [
        np.count_nonzero(hu > 700),
        np.count_nonzero((hu > 0) & (hu < 15)),
        np.count_nonzero(hu > -200),
    ]

  first = tissue_counts(1, "P1")
  follow_up = tissue_counts(2, "P1")
  other = tissue_counts(1, "P2")
  assert first == pytest.approx(follow_up, rel=0.03)
  assert first != pytest.approx(other, rel=0.03)


@pytest.mark.parametrize("name", SUBTYPES)
def test_forced_subtype_is_the_only_one(scans_per_subtype, name):
  scan = scans_per_subtype[name]
  assert set(np.unique(scan.mask)) == {0, MASK_CLASS_IDS[name]}
  expected = {label: int(label in ("any", name)) for label in SLICE_LABELS}
  assert {label: scan.scan_labels[label] for label in SLICE_LABELS} == expected
  assert scan.hematoma_ml[name] > 0.0


def test_empty_subtypes_give_normal_scan(scans_per_subtype):
  scan = scans_per_subtype["normal"]
  assert not scan.mask.any()
  assert not scan.slice_labels.any()
  assert all(scan.scan_labels[label] == 0 for label in SLICE_LABELS)
  assert all(len(b) == 0 for b in scan.boxes)
  assert all(v == 0.0 for v in scan.hematoma_ml.values())


def test_all_subtypes_together(scans_per_subtype):
  scan = scans_per_subtype["all"]
  assert set(np.unique(scan.mask)) == {0, 1, 2, 3, 4, 5}
  assert all(scan.scan_labels[label] == 1 for label in SLICE_LABELS)


def test_drawn_subtypes_mix_normal_and_multiple():
  counts = [
      sum(generate_scan(seed, (10, 64, 64), spacing_mm=(12.0, 3.4, 3.4)).scan_labels[n] for n in SUBTYPES)
      for seed in range(40)
  ]
  assert 0 in counts
  assert any(c == 1 for c in counts)
  assert any(c >= 2 for c in counts)


def test_unknown_subtype_raises():
  with pytest.raises(ValueError, match="unknown hemorrhage subtypes"):
    generate_scan(0, subtypes=("chronic",), **SMALL)
  with pytest.raises(ValueError, match="sequence of names"):
    generate_scan(0, subtypes="subdural", **SMALL)


def test_bad_shape_and_spacing_raise():
  with pytest.raises(ValueError, match="shape"):
    generate_scan(0, (0, 64, 64))
  with pytest.raises(ValueError, match="spacing_mm"):
    generate_scan(0, (4, 64, 64), spacing_mm=(5.0, -1.0, 1.0))


def test_mask_voxels_hold_blood_hu(scans_per_subtype):
  for name, scan in scans_per_subtype.items():
    hu = scan.volume.hu[scan.mask > 0]
    if name == "normal":
      assert hu.size == 0
      continue
    assert hu.min() >= BLOOD_HU[0], name
    assert hu.max() <= BLOOD_HU[1], name


def test_slice_labels_agree_with_mask(scans_per_subtype):
  for scan in scans_per_subtype.values():
    for column, label in enumerate(SLICE_LABELS):
      if label == "any":
        expected = (scan.mask > 0).any(axis=(1, 2))
      else:
        expected = (scan.mask == MASK_CLASS_IDS[label]).any(axis=(1, 2))
      np.testing.assert_array_equal(scan.slice_labels[:, column], expected, err_msg=label)


def test_boxes_are_tight_around_blood_of_their_class(scans_per_subtype):
  for scan in scans_per_subtype.values():
    for k in range(scan.mask.shape[0]):
      for class_id, box in zip(scan.box_classes[k], scan.boxes[k]):
        row_min, column_min, row_max, column_max = map(int, box)
        inside = scan.mask[k, row_min:row_max, column_min:column_max] == class_id
        # Every edge row and column of a tight box has blood of its class.
        for edge in (inside[0], inside[-1], inside[:, 0], inside[:, -1]):
          assert edge.any(), f"slice {k} box {box}"


def test_boxes_cover_all_blood_but_small_bleeds(scans_per_subtype):
  for scan in scans_per_subtype.values():
    pixel_mm2 = scan.volume.spacing[1] * scan.volume.spacing[2]
    for k in range(scan.mask.shape[0]):
      for class_id in range(1, 6):
        blood = scan.mask[k] == class_id
        covered = np.zeros_like(blood)
        for box_class, box in zip(scan.box_classes[k], scan.boxes[k]):
          if box_class == class_id:
            row_min, column_min, row_max, column_max = map(int, box)
            covered[row_min:row_max, column_min:column_max] = True
        # Blood outside every box is in bleeds too small for a box.
        outside, _ = ndimage.label(blood & ~covered, structure=np.ones((3, 3), bool))
        for found in ndimage.find_objects(outside):
          area_mm2 = np.count_nonzero(outside[found]) * pixel_mm2
          assert area_mm2 < generate.BOX_MIN_AREA_MM2, f"slice {k} class {class_id}"


def _one_slice_boxes(mask, pixel_mm=(2.4, 2.4)):
  boxes, classes = generate.boxes_from_mask(np.asarray(mask, np.uint8)[None], pixel_mm)
  return [(int(c), *map(int, b)) for c, b in zip(classes[0], boxes[0])]


def test_boxes_merge_close_pieces():
  mask = np.zeros((20, 20), np.uint8)
  mask[2:6, 2:6] = 4
  mask[2:6, 8:12] = 4  # 2 px = 4.8 mm from the first piece: one bleed.
  mask[12:16, 2:6] = 4
  mask[12:16, 9:13] = 4  # 3 px = 7.2 mm from its neighbour: two bleeds.
  assert _one_slice_boxes(mask) == [(4, 2, 2, 6, 12), (4, 12, 2, 16, 6), (4, 12, 9, 16, 13)]


def test_merge_gap_and_min_area_are_in_mm():
  mask = np.zeros((20, 20), np.uint8)
  mask[2:6, 2:6] = 4
  mask[2:6, 10:14] = 4  # 4 px apart: 4 mm at 1 mm pixels, 9.6 mm at 2.4 mm.
  assert len(_one_slice_boxes(mask, pixel_mm=(1.0, 1.0))) == 1
  assert len(_one_slice_boxes(mask, pixel_mm=(2.4, 2.4))) == 2


def test_boxes_skip_small_bleeds():
  mask = np.zeros((20, 20), np.uint8)
  mask[2, 2:5] = 2  # 3 px of 5.76 mm2: 17.3 mm2, under the 20 mm2 minimum.
  mask[10, 2:6] = 2  # 4 px: 23 mm2, boxed.
  mask[10, 7:11] = 3  # one pixel from the class 2 bleed, but another class.
  assert _one_slice_boxes(mask) == [(2, 10, 2, 11, 6), (3, 10, 7, 11, 11)]
  # The mask and slice labels keep the small bleed: only the boxes drop it.
  assert np.count_nonzero(mask == 2) == 7


def test_boxes_from_mask_rejects_bad_spacing():
  with pytest.raises(ValueError, match="pixel_mm"):
    generate.boxes_from_mask(np.zeros((1, 4, 4), np.uint8), (0.0, 1.0))


def test_hematoma_volume_agrees_with_mask(scans_per_subtype):
  for scan in scans_per_subtype.values():
    voxel_ml = np.prod(scan.volume.spacing) / 1000.0
    for name in SUBTYPES:
      count = np.count_nonzero(scan.mask == MASK_CLASS_IDS[name])
      assert scan.hematoma_ml[name] == pytest.approx(count * voxel_ml)


def test_bleed_shapes_and_places(scans_per_subtype):
  # Convexity collections touch the skull; the others sit inside the brain.
  for name in ("epidural", "subdural"):
    scan = scans_per_subtype[name]
    near_bone = ndimage.binary_dilation(scan.volume.hu > 300, iterations=2)
    assert (near_bone & (scan.mask > 0)).any(), name
  scan = scans_per_subtype["intraventricular"]
  near_bone = ndimage.binary_dilation(scan.volume.hu > 300, iterations=2)
  assert not (near_bone & (scan.mask > 0)).any()
  # An intraparenchymal clot may reach the cortex, but its centre is deep.
  scan = scans_per_subtype["intraparenchymal"]
  to_bone_mm = ndimage.distance_transform_edt(scan.volume.hu <= 300, sampling=scan.volume.spacing)
  centre = tuple(np.rint(np.mean(np.nonzero(scan.mask), axis=1)).astype(int))
  assert to_bone_mm[centre] > 10.0
  # Subarachnoid blood is thin: most of it within a voxel of non-blood.
  scan = scans_per_subtype["subarachnoid"]
  blood = scan.mask > 0
  interior = ndimage.binary_erosion(blood, structure=np.ones((1, 3, 3), bool))
  assert interior.sum() < 0.5 * blood.sum()


def test_subdural_crescent_is_longer_than_epidural_lens():
  # Per-slice extent along the skull over thickness: a crescent is long and
  # thin, a lens short and thick.
  def elongation(scan):
    k = int(np.argmax((scan.mask > 0).sum(axis=(1, 2))))
    region = scan.mask[k] > 0
    thickness = 2.0 * ndimage.distance_transform_edt(region).max()
    rows, columns = np.nonzero(region)
    length = np.hypot(np.ptp(rows), np.ptp(columns))
    return length / thickness

  subdural = [elongation(generate_scan(s, subtypes=("subdural",), **SMALL)) for s in range(3)]
  epidural = [elongation(generate_scan(s, subtypes=("epidural",), **SMALL)) for s in range(3)]
  assert min(subdural) > max(epidural)


def test_geometry_is_axial_lps():
  scan = generate_scan(3, (10, 64, 80), spacing_mm=(5.0, 2.5, 2.2))
  affine = scan.volume.affine
  np.testing.assert_allclose(affine[:3, 0], [0.0, 0.0, 5.0])  # Inferior to superior.
  np.testing.assert_allclose(affine[:3, 1], [0.0, 2.5, 0.0])  # Anterior to posterior.
  np.testing.assert_allclose(affine[:3, 2], [2.2, 0.0, 0.0])  # Right to left.
  indices = np.stack([np.arange(10), np.zeros(10), np.zeros(10), np.ones(10)], axis=1)
  np.testing.assert_allclose((indices @ affine.T)[:, :3], scan.volume.positions)


def test_skull_base_is_low_and_vertex_high():
  scan = generate_scan(3, (32, 128, 128), spacing_mm=(5.0, 1.8, 1.8), subtypes=())
  hu = scan.volume.hu
  head_area = (hu > -200).sum(axis=(1, 2))
  brain = (hu > 15) & (hu < 45)
  brain_area = brain.sum(axis=(1, 2))
  fat_area = ((hu > -200) & (hu < -50)).sum(axis=(1, 2))
  # The last slice is near the vertex: the smallest section.
  assert head_area[-1] < 0.5 * head_area.max()
  # Low slices cut the skull base: a section as large as the equator's, less
  # of it brain (the fossae), more of it fat (orbits, face).
  low, equator = slice(0, 6), slice(12, 18)
  assert head_area[low].mean() > 0.8 * head_area[equator].mean()
  assert brain_area[low].mean() < 0.8 * brain_area[equator].mean()
  assert fat_area[low].mean() > 1.3 * fat_area[equator].mean()
  # The posterior fossa lies behind the image centre on the lowest slices.
  rows = np.nonzero(brain[3])[0]
  assert rows.mean() > 64


def test_gantry_tilt_shears_positions():
  scan = generate_scan(3, (10, 64, 64), spacing_mm=(5.0, 3.0, 3.0), tilt_deg=20.0)
  step = np.diff(scan.volume.positions, axis=0)
  np.testing.assert_allclose(step[:, 2], 5.0)
  np.testing.assert_allclose(step[:, 1], -5.0 * np.tan(np.radians(20.0)))
  assert scan.volume.spacing[0] == 5.0
  assert scan.volume.provenance.gantry_tilt_deg == 20.0


def test_gantry_tilt_keeps_head_upright_in_patient_space():
  # The head is sampled at each voxel's patient position, so on tilted slices
  # it moves down the image rows as the slice positions move anterior.
  shape, spacing = (12, 128, 128), (5.0, 1.8, 1.8)
  upright = generate_scan(4, shape, spacing_mm=spacing, subtypes=(), noise_hu=0.0)
  tilted = generate_scan(4, shape, spacing_mm=spacing, subtypes=(), noise_hu=0.0, tilt_deg=15.0)
  shear_px = spacing[0] * np.tan(np.radians(15.0)) / spacing[1]
  for k in (2, 6, 9):
    rows = np.arange(shape[1])[:, None]
    centre_upright = (rows * (upright.volume.hu[k] > 500)).sum() / (upright.volume.hu[k] > 500).sum()
    centre_tilted = (rows * (tilted.volume.hu[k] > 500)).sum() / (tilted.volume.hu[k] > 500).sum()
    expected = (k - (shape[0] - 1) / 2) * shear_px
    assert centre_tilted - centre_upright == pytest.approx(expected, abs=1.0), f"slice {k}"


def test_dicom_round_trip(tmp_path, scans_per_subtype):
  scan = scans_per_subtype["all"]
  paths = write_dicom(scan, tmp_path / "series")
  assert len(paths) == scan.volume.num_slices
  volume = read_dicom_series(tmp_path / "series")
  np.testing.assert_array_equal(volume.hu, np.rint(scan.volume.hu))
  np.testing.assert_allclose(volume.affine, scan.volume.affine, atol=1e-4)
  np.testing.assert_allclose(volume.positions, scan.volume.positions, atol=1e-4)
  assert volume.provenance.patient_id == scan.patient_id


def test_dicom_round_trip_with_tilt(tmp_path):
  scan = generate_scan(8, (8, 96, 96), spacing_mm=(5.0, 2.4, 2.4), tilt_deg=-15.0)
  write_dicom(scan, tmp_path / "series")
  volume = read_dicom_series(tmp_path / "series")
  np.testing.assert_array_equal(volume.hu, np.rint(scan.volume.hu))
  np.testing.assert_allclose(volume.positions, scan.volume.positions, atol=1e-4)
  assert volume.provenance.gantry_tilt_deg == pytest.approx(-15.0, abs=0.01)


def test_nifti_round_trip(tmp_path, scans_per_subtype):
  scan = scans_per_subtype["all"]
  image_path, mask_path = write_nifti(scan, tmp_path / "ct.nii.gz", tmp_path / "mask.nii.gz")
  volume = read_nifti(image_path)
  np.testing.assert_array_equal(volume.hu, np.rint(scan.volume.hu))
  np.testing.assert_allclose(volume.affine, scan.volume.affine, atol=1e-4)
  paired, mask = read_nifti_pair(image_path, mask_path)
  np.testing.assert_array_equal(mask, scan.mask)


@pytest.mark.parametrize("tilt_deg", [0.0, 12.0])
def test_dcm2niix_converts_written_series(tmp_path, tilt_deg):
  scan = generate_scan(9, (8, 96, 96), spacing_mm=(5.0, 2.4, 2.4), tilt_deg=tilt_deg)
  write_dicom(scan, tmp_path / "series")
  result = subprocess.run(
      [dcm2niix_tool.binary(), "-z", "n", "-f", "out", "-o", str(tmp_path), str(tmp_path / "series")],
      capture_output=True,
      text=True,
      check=False,
  )
  assert result.returncode == 0, result.stdout + result.stderr
  assert "error" not in result.stdout.lower(), result.stdout
  assert (tmp_path / "out.nii").exists()


# Realism against the real GE head scan. "Inside the head" is the same for both:
# HU above -200, holes filled slice by slice. The tolerances are ratios to the
# real scan's values (its brain peak is 31 HU, 8.5% of the head is above 700 HU,
# 15% in -100..0, 5.5% in 0..15 and 35% in 20..45).
PEAK_TOLERANCE_HU = 4.0
FRACTION_RATIO_LIMITS = {
    "bone": (0.5, 2.0),
    "fat_and_soft_tissue": (0.33, 3.0),
    "csf": (0.33, 3.0),
    "brain": (0.5, 2.0),
}


def _head_statistics(hu: np.ndarray) -> dict[str, float]:
  head = np.stack([ndimage.binary_fill_holes(s) for s in hu > -200.0])
  values = hu[head]
  counts, edges = np.histogram(values, bins=np.arange(0.0, 61.0, 1.0))
  smooth = np.convolve(counts, np.ones(5) / 5, mode="same")
  return {
      "brain_peak_hu": float(edges[np.argmax(smooth)]),
      "bone": float(np.mean(values > 700.0)),
      "fat_and_soft_tissue": float(np.mean((values >= -100.0) & (values < 0.0))),
      "csf": float(np.mean((values >= 0.0) & (values < 15.0))),
      "brain": float(np.mean((values >= 20.0) & (values < 45.0))),
  }


def _realism_failures(phantom: dict[str, float], real: dict[str, float]) -> list[str]:
  failures = []
  if abs(phantom["brain_peak_hu"] - real["brain_peak_hu"]) > PEAK_TOLERANCE_HU:
    failures.append(f"brain peak {phantom['brain_peak_hu']} HU vs {real['brain_peak_hu']} HU")
  for name, (low, high) in FRACTION_RATIO_LIMITS.items():
    ratio = phantom[name] / real[name]
    if not low <= ratio <= high:
      failures.append(f"{name} fraction {phantom[name]:.3f} vs {real[name]:.3f}")
  return failures


@pytest.fixture(scope="module")
def real_head_statistics(real_ct_dir) -> dict[str, float]:
  volume = read_dicom_series(real_ct_dir / "ge_head_tilt_variable_spacing", min_slices=2)
  return _head_statistics(volume.hu)


def test_histogram_resembles_real_head(real_head_statistics):
  for seed in (0, 1):
    phantom = _head_statistics(generate_scan(seed, subtypes=()).volume.hu)
    assert _realism_failures(phantom, real_head_statistics) == [], f"seed {seed}: {phantom}"


def test_histogram_check_rejects_crude_phantom(real_head_statistics):
  # A uniform 30 HU ellipsoid in a 6 mm, 1200 HU skull, with 5 HU noise.
  rng = np.random.default_rng(0)
  z, y, x = np.meshgrid(
      np.linspace(-1.1, 1.1, 32), np.linspace(-1.2, 1.2, 256), np.linspace(-1.2, 1.2, 256),
      indexing="ij",
  )
  radius = np.sqrt(x**2 + (y / 1.2) ** 2 + z**2)
  hu = np.where(radius < 0.9, 30.0, np.where(radius < 0.95, 1200.0, -1000.0))
  hu = hu + rng.normal(0.0, 5.0, hu.shape)
  failures = _realism_failures(_head_statistics(hu), real_head_statistics)
  assert any(f.startswith("csf") for f in failures)
  assert any(f.startswith("fat_and_soft_tissue") for f in failures)
  assert any(f.startswith("brain fraction") for f in failures)


# Findings beyond the acute bleeds: CQ500 labels, midline shift, fractures and
# chronic subdural collections.

TINY = dict(shape=(10, 64, 64), spacing_mm=(12.0, 3.4, 3.4))
# Digests of scans from the generator as it was before the new findings
# (mask sha256, sum of HU in float64), for seeds that draw none of them.
UNCHANGED_SCANS = {
    0: ("1c868a0e59ec47e3", -18997225.612867832),
    2: ("02b1c22346806178", -21046166.459649444),
    3: ("02b1c22346806178", -21258389.102304846),
    5: ("76587ebdf3b44c0a", -23227385.353379786),
}


@pytest.mark.parametrize("seed", sorted(UNCHANGED_SCANS))
def test_scan_without_findings_is_unchanged(seed):
  scan = generate_scan(seed, **TINY)
  assert scan.midline_shift_mm == 0.0
  assert scan.fracture == "none"
  assert scan.chronic_ml == 0.0
  mask_digest, hu_sum = UNCHANGED_SCANS[seed]
  assert hashlib.sha256(scan.mask.tobytes()).hexdigest()[:16] == mask_digest
  assert float(scan.volume.hu.astype(np.float64).sum()) == pytest.approx(hu_sum, rel=1e-9)
  # Forcing the findings off changes nothing for these seeds.
  forced = generate_scan(seed, chronic=False, fracture="none", midline_shift_mm=0.0, **TINY)
  np.testing.assert_array_equal(forced.volume.hu, scan.volume.hu)


def test_cq500_labels_follow_the_truth():
  for seed in range(8):
    scan = generate_scan(seed, **TINY)
    labels = scan.scan_labels
    assert set(CQ500_LABELS) <= set(labels)
    assert labels["ICH"] == labels["any"]
    assert labels["SDH"] == labels["subdural"]
    assert labels["BleedLocation-Left"] == int(scan.bleed_side in ("left", "bilateral"))
    assert labels["BleedLocation-Right"] == int(scan.bleed_side in ("right", "bilateral"))
    assert labels["ChronicBleed"] == int(scan.chronic_ml > 0)
    assert labels["Fracture"] == int(scan.fracture != "none")
    assert labels["CalvarialFracture"] + labels["OtherFracture"] == labels["Fracture"]
    assert labels["MassEffect"] == int(scan.midline_shift_mm >= 2.0)
    assert labels["MidlineShift"] == int(scan.midline_shift_mm >= 5.0)
    assert labels["Fracture"] == int(scan.fracture_mask.any())


def test_cq500_label_frequencies():
  # Each label is positive in some scans and absent in others. ICH and the
  # side labels are common because 70% of drawn scans bleed, a share fixed
  # before the CQ500 labels existed. The other labels stay within 5-50%.
  num_scans = 40
  counts = dict.fromkeys(CQ500_LABELS, 0)
  for seed in range(num_scans):
    scan = generate_scan(seed, (24, 128, 128), spacing_mm=(5.0, 1.8, 1.8))
    for name in CQ500_LABELS:
      counts[name] += scan.scan_labels[name]
  shares = {name: count / num_scans for name, count in counts.items()}
  for name in CQ500_LABELS:
    assert 0.05 <= shares[name] <= 0.9, (name, shares)
  for name in ("ChronicBleed", "Fracture", "CalvarialFracture", "OtherFracture", "MassEffect",
               "MidlineShift", "IPH", "IVH", "SDH", "EDH", "SAH"):
    assert shares[name] <= 0.5, (name, shares)


def _septum_columns(hu_slice: np.ndarray) -> dict[int, float]:
  """Per row, the centre column of the tissue strip between the two central CSF runs."""
  columns = hu_slice.shape[1]
  centre = columns // 2
  found = {}
  for row in range(hu_slice.shape[0]):
    csf = (hu_slice[row] > -50) & (hu_slice[row] < 18)
    window = csf[centre - 20 : centre + 20]
    runs = np.flatnonzero(np.diff(window.astype(np.int8)))
    # Exactly two CSF runs: off, on, off, on, off.
    if runs.size != 4:
      continue
    found[row] = centre - 20 + (runs[1] + 1 + runs[2]) / 2
  return found


def test_midline_shift_moves_septum_by_recorded_mm():
  shape, spacing = (16, 128, 128), (8.0, 1.8, 1.8)
  straight = generate_scan(3, shape, spacing_mm=spacing, subtypes=(), noise_hu=0.0)
  shifted = generate_scan(
      3, shape, spacing_mm=spacing, subtypes=(), noise_hu=0.0, midline_shift_mm=8.0
  )
  assert shifted.midline_shift_mm == 8.0
  assert shifted.scan_labels["MassEffect"] == shifted.scan_labels["MidlineShift"] == 1
  moves = []
  for k in range(shape[0]):
    before = _septum_columns(straight.volume.hu[k])
    after = _septum_columns(shifted.volume.hu[k])
    moves += [after[row] - before[row] for row in before.keys() & after.keys()]
  assert len(moves) >= 5, "no slice shows the septum between two ventricles"
  moves_mm = np.array(moves) * spacing[2]
  largest = moves_mm[np.argmax(np.abs(moves_mm))]
  assert abs(abs(largest) - shifted.midline_shift_mm) <= spacing[2]
  # Columns run to the patient's left, so a shift to the right lowers them.
  assert np.sign(largest) == {"left": 1, "right": -1}[shifted.midline_shift_toward]
  # The skull does not move.
  bone = straight.volume.hu > 700
  np.testing.assert_array_equal(shifted.volume.hu > 700, bone)


def test_midline_shift_moves_away_from_the_mass():
  for seed in (20, 21, 22):
    scan = generate_scan(seed, subtypes=("subdural",), midline_shift_mm=6.0, **SMALL)
    assert scan.bleed_side in ("left", "right")
    assert scan.midline_shift_toward == {"left": "right", "right": "left"}[scan.bleed_side]


def test_drawn_midline_shift_needs_mass():
  for seed in range(12):
    scan = generate_scan(seed, **TINY)
    if scan.midline_shift_mm > 0:
      assert max(scan.hematoma_ml[n] for n in ("epidural", "intraparenchymal", "subdural")) > 15
      assert scan.midline_shift_toward in ("left", "right")
    else:
      assert scan.midline_shift_toward == "none"


@pytest.mark.parametrize("kind", ["calvarial", "other"])
def test_fracture_gap_is_soft_tissue_in_bone(kind):
  for seed in (3, 4):
    intact = generate_scan(seed, subtypes=(), noise_hu=0.0, fracture="none", **SMALL)
    broken = generate_scan(seed, subtypes=(), noise_hu=0.0, fracture=kind, **SMALL)
    gap = broken.fracture_mask
    assert broken.fracture == kind
    assert gap.any()
    assert intact.volume.hu[gap].min() > 300.0, "the gap is not in bone"
    hu = broken.volume.hu[gap]
    assert hu.min() >= 25.0
    assert hu.max() <= 55.0
    # Outside the fracture's reach the scans agree.
    far = ~ndimage.binary_dilation(gap, iterations=12)
    np.testing.assert_array_equal(broken.volume.hu[far], intact.volume.hu[far])


def test_calvarial_fracture_breaks_the_ring():
  # On a slice of the fracture, soft tissue connects the brain to the scalp
  # through the skull; the intact skull separates them.
  def connected(hu_slice):
    soft, _ = ndimage.label(hu_slice < 300, structure=np.ones((3, 3), bool))
    centre = soft[hu_slice.shape[0] // 2, hu_slice.shape[1] // 2]
    return centre > 0 and centre == soft[0, 0]

  for seed in (3, 4, 5):
    intact = generate_scan(seed, subtypes=(), noise_hu=0.0, fracture="none", **SMALL)
    broken = generate_scan(seed, subtypes=(), noise_hu=0.0, fracture="calvarial", **SMALL)
    slices = np.flatnonzero(broken.fracture_mask.any(axis=(1, 2)))
    assert slices.size >= 2, "the fracture spans a single slice"
    assert any(connected(broken.volume.hu[k]) for k in slices)
    assert not any(connected(intact.volume.hu[k]) for k in slices)


def test_chronic_subdural_is_hypodense_class_5():
  scan = generate_scan(7, subtypes=(), noise_hu=0.0, chronic=True, **SMALL)
  region = scan.mask > 0
  assert region.any()
  assert set(np.unique(scan.mask[region])) == {MASK_CLASS_IDS["subdural"]}
  hu = scan.volume.hu[region]
  assert hu.min() >= 0.0
  assert hu.max() <= 25.0
  voxel_ml = np.prod(scan.volume.spacing) / 1000
  assert scan.chronic_ml == pytest.approx(region.sum() * voxel_ml)
  assert scan.hematoma_ml["subdural"] == pytest.approx(scan.chronic_ml)
  assert scan.scan_labels["ChronicBleed"] == scan.scan_labels["SDH"] == 1
  assert scan.slice_labels[:, SLICE_LABELS.index("subdural")].any()
  # Near the skull, on one side only.
  near_bone = ndimage.binary_dilation(scan.volume.hu > 300, iterations=2)
  assert (near_bone & region).any()
  assert scan.bleed_side in ("left", "right")


def test_acute_blood_over_chronic_counts_as_acute():
  scan = generate_scan(7, subtypes=("subdural",), chronic=True, **SMALL)
  assert scan.hematoma_ml["subdural"] >= scan.chronic_ml > 0.0
  acute = generate_scan(7, subtypes=("subdural",), chronic=False, **SMALL)
  assert (acute.mask[scan.mask == 0] == 0).all()


def test_findings_are_deterministic():
  first = generate_scan(7, **TINY)
  second = generate_scan(7, **TINY)
  np.testing.assert_array_equal(first.volume.hu, second.volume.hu)
  np.testing.assert_array_equal(first.fracture_mask, second.fracture_mask)
  assert first.scan_labels == second.scan_labels
  assert first.midline_shift_mm == second.midline_shift_mm


def test_forced_finding_errors():
  with pytest.raises(InputError, match="chronic"):
    generate_scan(0, chronic="yes", **TINY)
  with pytest.raises(InputError, match="fracture"):
    generate_scan(0, fracture="skull", **TINY)
  with pytest.raises(InputError, match="fracture"):
    generate_scan(0, fracture=True, **TINY)
  for bad in (-1.0, 15.0, True, "5"):
    with pytest.raises(InputError, match="midline_shift_mm"):
      generate_scan(0, midline_shift_mm=bad, **TINY)
  # A small field of view scales the head down, and the largest shift with it.
  with pytest.raises(InputError, match="field of view"):
    generate_scan(0, (10, 32, 32), spacing_mm=(12.0, 3.4, 3.4), midline_shift_mm=12.0)
  # Four slices around the ventricles reach neither the skull base nor the face.
  with pytest.raises(InputError, match="cannot place"):
    generate_scan(0, (4, 64, 64), spacing_mm=(5.0, 3.4, 3.4), subtypes=(), fracture="other")


def test_forced_chronic_covered_by_acute_blood_raises():
  # On this grid the drawn acute bleeds cover every voxel of the collection.
  with pytest.raises(InputError, match="chronic subdural collection is covered by acute blood"):
    generate_scan(1, (1, 8, 8), chronic=True)
  scan = generate_scan(1, (1, 8, 8), chronic=True, subtypes=())
  assert scan.chronic_ml > 0.0
  assert scan.scan_labels["ChronicBleed"] == 1


def _fracture_in_blood(blood: np.ndarray):
  """A fracture maker whose whole-voxel gap is exactly the voxels of `blood`."""

  def make(rng, grid, head):
    box = tuple(slice(0, n) for n in blood.shape)
    return findings.Fracture(
        kind="calvarial", box=box, fraction=blood.astype(np.float32), fill_hu=40.0, gap_mm=2.0
    )

  return make


def test_fracture_hidden_by_blood(monkeypatch):
  # Seed 7 draws bleeds and a calvarial fracture on this grid. The fake gap
  # covers exactly the blood, which the painting keeps out of any gap, and
  # the fracture is placed after the mask is final, so the mask is known.
  forced_blood = generate_scan(7, fracture="none", **TINY).mask > 0
  drawn_blood = generate_scan(7, **TINY).mask > 0
  assert generate_scan(7, **TINY).fracture == "calvarial"
  assert forced_blood.any()
  assert drawn_blood.any()
  monkeypatch.setitem(findings.FRACTURE_MAKERS, "calvarial", _fracture_in_blood(forced_blood))
  with pytest.raises(InputError, match="fracture gap lies wholly in blood"):
    generate_scan(7, fracture="calvarial", **TINY)
  monkeypatch.setitem(findings.FRACTURE_MAKERS, "calvarial", _fracture_in_blood(drawn_blood))
  drawn = generate_scan(7, **TINY)
  assert drawn.fracture == "none"
  assert drawn.scan_labels["Fracture"] == 0
  assert not drawn.fracture_mask.any()


def test_midline_shift_carries_ventricular_blood():
  # Blood placed in the straight ventricles moves with them: the voxels it
  # fills are CSF in the shifted normal head of the same seed (forced
  # subtypes draw nothing, so the head is the same).
  kw = dict(noise_hu=0.0, midline_shift_mm=10.0, **SMALL)
  bleeding = generate_scan(22, subtypes=("intraventricular",), **kw)
  normal = generate_scan(22, subtypes=(), **kw)
  straight = generate_scan(22, subtypes=(), noise_hu=0.0, **SMALL)
  blood = bleeding.mask > 0
  assert blood.any()
  # About 95% without a shift (the rest is partial volume at the walls);
  # nearest-neighbour transport costs a few percent more.
  assert np.mean(normal.volume.hu[blood] < 20.0) > 0.85
  # The straight ventricles miss most of the moved blood.
  assert np.mean(straight.volume.hu[blood] < 20.0) < 0.5
  assert bleeding.volume.hu[blood].min() >= BLOOD_HU[0]
