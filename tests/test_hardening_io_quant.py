"""Hardening of fastopt.load (each member read at most once, a bound on the bytes a file
declares, malformed files refused with a ValueError naming the path) and of the quantization
scales (checked in the dtype they are used in; qparams only returns scales the functions
accept)."""

import inspect
import io
import json
import re
import tracemalloc
import zipfile

import numpy as np
import pytest
from conftest import CPU_BACKENDS, require_backend

import fastopt
from fastopt import _backends, _io, quant

STRUCTURE = "__fastopt_structure__"
F32 = np.finfo(np.float32)
LO32 = np.nextafter(np.float32(1) / F32.max, np.float32(1))  # least with a finite 1 / s
LO64 = np.nextafter(np.float64(1) / np.finfo(np.float64).max, np.float64(1))
QUANT_BACKENDS = [b for b in _backends.OPS["quant_loop"] if b in CPU_BACKENDS]
pytestmark = pytest.mark.filterwarnings("ignore:.*quantized tensor creation:UserWarning")


# -- fastopt.load

def _write(path, structure, compressed=False, **arrays):
    """A file as save writes one, with a handcrafted structure (JSON-able, or raw bytes)."""
    text = structure if isinstance(structure, bytes) else json.dumps(structure).encode()
    (np.savez_compressed if compressed else np.savez)(
        path, **{STRUCTURE: np.frombuffer(text, np.uint8)}, **arrays)
    return path


def _npy(header, data=b""):
    """An .npy member: a version 1.0 header (a dict as numpy writes it) and raw data."""
    f = io.BytesIO()
    np.lib.format.write_array_header_1_0(f, header)
    return f.getvalue() + data


def _zip(path, members):
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def _structure_npy(structure):
    f = io.BytesIO()
    np.lib.format.write_array(f, np.frombuffer(json.dumps(structure).encode(), np.uint8))
    return f.getvalue()


@pytest.fixture
def reads(monkeypatch):
    """The names of the members whose arrays are read (np.lib.format.read_array), in order;
    reading one twice fails the test there, before it takes more memory."""
    names = []
    real = np.lib.format.read_array

    def counting(fp, *args, **kw):
        assert fp.name not in names, f"{fp.name} read twice"
        names.append(fp.name)
        return real(fp, *args, **kw)
    monkeypatch.setattr(np.lib.format, "read_array", counting)
    return names


def _path_error(path):
    return re.escape(f"load: {path} ")


def test_load_reads_each_member_once(tmp_path, reads):
    w = np.arange(6.0)
    path = tmp_path / "ok.npz"
    fastopt.save({"w": w, "again": [w, w], "n": 3}, path)  # the same array, written 3 times
    back = fastopt.load(path)
    assert sorted(reads) == sorted(["a0.npy", "a1.npy", "a2.npy", f"{STRUCTURE}.npy"])
    assert back["n"] == 3 and back["again"][0] is not back["again"][1]
    for a in (back["w"], *back["again"]):
        np.testing.assert_array_equal(a, w)


@pytest.mark.parametrize("where", ["list", "dict", "nested"])
def test_load_refuses_a_member_named_twice_before_reading_it(tmp_path, reads, where):
    """A small file naming one large member many times asked for its size per naming."""
    ref = {"array": "a0"}
    structure = {"list": [ref] * 1000} if where == "list" else \
        {"dict": [[{"value": "a"}, ref], [{"value": "b"}, ref]]} if where == "dict" else \
        {"list": [ref, {"tuple": [{"value": 1}, {"list": [ref]}]}]}
    path = _write(tmp_path / "twice.npz", structure, compressed=True,
                  a0=np.zeros(2**22, np.float64))  # 32 MiB, 32 KiB compressed
    assert path.stat().st_size < 2**17
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=_path_error(path) + ".*'a0' twice"):
            fastopt.load(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert reads == [f"{STRUCTURE}.npy"]  # the structure only: a0 was never read
    assert peak < 2**24


def test_load_bounds_the_bytes_a_file_declares(tmp_path, reads):
    a0 = np.ones(2**17, np.float64)  # 1 MiB
    path = _write(tmp_path / "big.npz", {"list": [{"array": "a0"}]}, compressed=True, a0=a0)
    with pytest.raises(ValueError, match=_path_error(path) + r"declares \d+ bytes of members, "
                       r"more than max_bytes=1048576; pass a larger max_bytes, or None"):
        fastopt.load(path, max_bytes=2**20)  # the .npy header's bytes go over
    assert reads == []  # checked before any member is read
    for enough in (2**20 + 2**12, None):
        np.testing.assert_array_equal(fastopt.load(path, max_bytes=enough)[0], a0)
        reads.clear()
    assert inspect.signature(fastopt.load).parameters["max_bytes"].default \
        == _io.MAX_LOAD_BYTES == 16 * 2**30


def test_load_bounds_the_size_an_npy_header_declares(tmp_path, reads):
    """numpy allocates what a header declares before it reads the data: 8 TiB here, from a
    file of a few hundred bytes."""
    path = _zip(tmp_path / "liar.npz", {
        f"{STRUCTURE}.npy": _structure_npy({"array": "a0"}),
        "a0.npy": _npy({"descr": "<f8", "fortran_order": False, "shape": (2**40,)}, b"\0" * 16),
    })
    with pytest.raises(ValueError, match=_path_error(path) + r"declares \d{13} bytes"):
        fastopt.load(path)
    assert reads == []


def test_load_bounds_what_the_zip_directory_declares(tmp_path, reads):
    """Members that are not arrays count too, by their size in the zip directory."""
    path = _write(tmp_path / "extra.npz", {"value": None})
    with zipfile.ZipFile(path, "a", zipfile.ZIP_DEFLATED) as z:
        z.writestr("notes.txt", b"\0" * 2**20)
    with pytest.raises(ValueError, match="more than max_bytes=1000000"):
        fastopt.load(path, max_bytes=10**6)
    assert reads == []
    assert fastopt.load(path) is None


@pytest.mark.parametrize("max_bytes, error", [(-1, ValueError), (1.5, TypeError),
                                              ("1", TypeError), (True, TypeError)])
def test_load_checks_max_bytes(tmp_path, max_bytes, error):
    path = _write(tmp_path / "x.npz", {"value": 1})
    with pytest.raises(error, match="max_bytes must be"):
        fastopt.load(path, max_bytes=max_bytes)


MALFORMED = {
    "not JSON": (b"{not json", "not JSON"),
    "not UTF-8": (b"\xff\xfe", "not JSON"),
    "a JSON list": ([1, 2], r"holds \[1, 2\], not a JSON object of one entry"),
    "two entries": ({"value": 1, "float": "2"}, "not a JSON object of one entry"),
    "unknown kind": ({"bogus": 1}, "which save does not write"),
    "missing member": ({"list": [{"array": "a9"}]}, "member 'a9', which it does not hold"),
    "the structure as an array": ({"array": STRUCTURE}, "which it does not hold"),
    "array name not a string": ({"array": 5}, "which save does not write"),
    "list not a list": ({"list": 3}, "a list of 3, not a list"),
    "dict not a list": ({"dict": {"a": 1}}, "a dict of .*, not a list"),
    "dict of no pairs": ({"dict": [[{"value": "k"}]]}, r"not of \[key, value\] pairs"),
    "unhashable key": ({"dict": [[{"list": []}, {"value": 1}]]}, r"a dict key \[\]"),
    "array as a key": ({"dict": [[{"array": "a0"}, {"value": 1}]]}, "which save does not"),
    "float not a string": ({"float": 1.5}, "which save does not write"),
    "float not a number": ({"float": "abc"}, "the float 'abc'"),
    "value a list": ({"value": [1]}, "which save does not write"),
    "nested too deeply": (b'{"list":[' * 100000 + b'{"value":1}' + b"]}" * 100000,
                          "nested too deeply"),
}


@pytest.mark.parametrize("structure, match", MALFORMED.values(), ids=MALFORMED.keys())
def test_load_refuses_a_malformed_structure(tmp_path, reads, structure, match):
    path = _write(tmp_path / "bad.npz", structure, a0=np.arange(3.0))
    with pytest.raises(ValueError, match=_path_error(path) + "was not written by "
                       "fastopt.save: .*" + match):
        fastopt.load(path)
    assert "a0.npy" not in reads


def _files():
    """Files that are not what save writes, and what their error says."""
    header = {"descr": "<f8", "fortran_order": False, "shape": (10,)}
    return {
        "not a zip": (lambda p: p.write_bytes(b"hello"), "not an .npz archive"),
        "an .npy file": (lambda p: p.write_bytes(_npy(header, b"\0" * 80)),
                         "not an .npz archive"),
        "no structure": (lambda p: np.savez(p, a0=np.arange(3)), "holds no"),
        "structure of floats": (lambda p: np.savez(p, **{STRUCTURE: np.zeros(3)}),
                                "structure is a float64 array"),
        "object member": (lambda p: _write(p, {"array": "a0"}, a0=np.array([{}], object)),
                          "member 'a0' is not a readable array"),
        "short data": (lambda p: _zip(p, {f"{STRUCTURE}.npy": _structure_npy({"array": "a0"}),
                                          "a0.npy": _npy(header, b"\0" * 16)}),
                       "member 'a0' is not a readable array"),
        "negative shape": (lambda p: _zip(p, {
            f"{STRUCTURE}.npy": _structure_npy({"array": "a0"}),
            "a0.npy": _npy(dict(header, shape=(-(2**40), -8)))}), r"declares the shape"),
        "bad header": (lambda p: _zip(p, {f"{STRUCTURE}.npy": _structure_npy({"value": 1}),
                                          "a0.npy": b"\x93NUMPY\x01\x00\x04\x00{}  "}),
                       "member 'a0.npy' has no valid .npy header"),
        "not npy": (lambda p: _zip(p, {f"{STRUCTURE}.npy": _structure_npy({"value": 1}),
                                       "a0.npy": b"plain text"}),
                    "member 'a0.npy' has no valid .npy header"),
    }


@pytest.mark.parametrize("name", list(_files()))
def test_load_refuses_files_save_does_not_write(tmp_path, name):
    make, match = _files()[name]
    path = tmp_path / "f.npz"
    make(path)
    with pytest.raises(ValueError, match=_path_error(path) + ".*" + match):
        fastopt.load(path)


def test_load_refuses_a_corrupt_archive(tmp_path):
    path = _write(tmp_path / "c.npz", {"array": "a0"}, compressed=True,
                  a0=np.arange(1000.0))
    raw = bytearray(path.read_bytes())
    at = raw.index(b"a0.npy") + 200  # inside a0's compressed data
    raw[at:at + 8] = b"\xff" * 8
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=_path_error(path) + "is corrupt"):
        fastopt.load(path)


# -- quantization scales, checked in the dtype they are used in

def _params(scale, axis):
    """(scale, zero point): per tensor, or per channel of 3 with `scale` the second."""
    return (scale, 0) if axis is None else (np.array([0.1, scale, 0.2]), np.zeros(3, int))


Q = np.arange(-6, 6, dtype=np.int8).reshape(3, 4)
# name -> (call(x, scale, zero point, axis), the dtype the scale is used in)
CALLS = {
    "quantize-f32": (lambda x, s, z, axis: quant.quantize(x, s, z, axis=axis), np.float32),
    "quantize-f64": (lambda x, s, z, axis: quant.quantize(x.astype(np.float64), s, z,
                                                          axis=axis), np.float64),
    "dequantize": (lambda x, s, z, axis: quant.dequantize(Q, s, z, axis=axis),
                   "float32 per tensor, else float64"),
    "dequantize-f64": (lambda x, s, z, axis: quant.dequantize(Q, s, z, axis=axis,
                                                              dtype="float64"), np.float64),
    "fake_quantize-f32": (lambda x, s, z, axis: quant.fake_quantize(x, s, z, -128, 127,
                                                                    axis=axis), np.float32),
    "fake_quantize-f64": (lambda x, s, z, axis: quant.fake_quantize(x.astype(np.float64), s, z,
                                                                    -128, 127, axis=axis),
                          np.float32),
    "fake_quantize_backward": (lambda x, s, z, axis: quant.fake_quantize_backward(
        np.ones_like(x), x, s, z, -128, 127, axis=axis), np.float32),
}


def _used(call, axis):
    dtype = CALLS[call][1]
    if isinstance(dtype, str):
        dtype = np.float32 if axis is None else np.float64
    return np.dtype(dtype)


# in float32 / float64: 0, rounds to 0, a reciprocal that overflows, rounds to inf
BAD_SCALES = {np.dtype(np.float32): [0.0, -0.1, 1e-50, 1e-45, 1e-40,
                                     float(np.nextafter(LO32, np.float32(0))), 3.5e38, 1e39,
                                     float("inf"), float("nan")],
              np.dtype(np.float64): [0.0, -1e-300, 1e-330, 1e-320,
                                     float(np.nextafter(LO64, 0.0)), float("inf"),
                                     float("nan")]}
RANGES = {np.dtype(np.float32): "[2.938737e-39, 3.4028235e+38]",
          np.dtype(np.float64): "[5.56268464626801e-309, 1.7976931348623157e+308]"}


def _bad_cases():
    return [pytest.param(call, axis, bad, id=f"{call}-{axis}-{bad!r}")
            for call in CALLS for axis in (None, 0)
            for bad in BAD_SCALES[_used(call, axis)]]


@pytest.mark.parametrize("call, axis, bad", _bad_cases())
def test_scale_out_of_its_dtypes_range_is_refused(call, axis, bad):
    x = (np.arange(12, dtype=np.float32).reshape(3, 4) - 6) * 0.25
    before = x.copy()
    used = _used(call, axis)
    where = "" if axis is None else r"\[1\]"
    with pytest.raises(ValueError, match=rf"scale{where} must be finite and > 0 in "
                       rf"{used.name}, the dtype it is used in, with a finite reciprocal: a "
                       rf"value in {re.escape(RANGES[used])}, got {re.escape(repr(bad))}"):
        CALLS[call][0](x, *_params(bad, axis), axis)
    np.testing.assert_array_equal(x, before)


def _edge_cases():
    return [pytest.param(call, axis, edge, id=f"{call}-{axis}-{i}")
            for call in CALLS for axis in (None, 0)
            for i, edge in enumerate(_edges(_used(call, axis)))]


def _edges(dtype):
    """The ends of the range, and scales only a wider dtype holds."""
    t = dtype.type
    wider = [1e-45, 1e-40, 1e39, 1e300] if dtype == np.float64 else []
    return [float(LO32 if t == np.float32 else LO64), float(np.finfo(t).max)] + wider


@pytest.mark.parametrize("call, axis, scale", _edge_cases())
def test_scale_at_the_ends_of_its_dtypes_range_is_taken(call, axis, scale):
    x = (np.arange(12, dtype=np.float32).reshape(3, 4) - 6) * 0.25
    got = np.asarray(CALLS[call][0](x, *_params(scale, axis), axis))
    assert not np.isnan(got.astype(np.float64)).any()


@pytest.mark.parametrize("backend", QUANT_BACKENDS)
@pytest.mark.parametrize("scale", [float(LO32), 2.94e-39, 1.2e-38, 1e-30, 1e30, 3e38,
                                   float(F32.max)])
def test_scales_near_float32_ends_match_torch(backend, scale, torch):
    require_backend(backend)
    s32 = np.float32(scale)
    k = np.array([-300, -128, -3, -1.5, -0.5, 0, 0.5, 1, 2.5, 3, 127, 127.5, 300])
    if scale > 1:
        k = k / 300  # within float32's range
    x = (k * np.float64(s32)).astype(np.float32)
    tx = torch.from_numpy(x)
    for qdtype, tdtype, zp in [("int8", torch.qint8, 0), ("uint8", torch.quint8, 128)]:
        q = quant.quantize(x, scale, zp, qdtype, backend=backend)
        tq = torch.quantize_per_tensor(tx, scale, zp, tdtype)
        np.testing.assert_array_equal(q, tq.int_repr().numpy())
        np.testing.assert_array_equal(quant.dequantize(q, scale, zp, backend=backend),
                                      tq.dequantize().numpy())
        X = np.stack([x, x])
        scales, zps = np.array([scale, scale]), np.array([zp, zp + 1])
        qc = quant.quantize(X, scales, zps, qdtype, axis=0, backend=backend)
        tqc = torch.quantize_per_channel(torch.from_numpy(X), torch.from_numpy(scales),
                                         torch.from_numpy(zps), 0, tdtype)
        np.testing.assert_array_equal(qc, tqc.int_repr().numpy())
        np.testing.assert_array_equal(quant.dequantize(qc, scales, zps, axis=0,
                                                       backend=backend),
                                      tqc.dequantize().numpy())
    np.testing.assert_array_equal(
        quant.fake_quantize(x, scale, 0, -128, 127, backend=backend),
        torch.fake_quantize_per_tensor_affine(tx, scale, 0, -128, 127).numpy())


def test_torch_gives_wrong_codes_past_the_range(torch):
    """Why the range: just below it torch maps 0.0 to 127 (1 / s is inf, 0 * inf NaN),
    above it torch's dequantized values are NaN."""
    x = torch.zeros(3)
    below = float(np.nextafter(LO32, np.float32(0)))
    assert torch.quantize_per_tensor(x, below, 0, torch.qint8).int_repr().tolist() == [127] * 3
    assert torch.quantize_per_tensor(x, 1e39, 0, torch.qint8).dequantize().isnan().all()
    with pytest.raises(ValueError, match="scale must be finite and > 0 in float32"):
        quant.quantize(x.numpy(), below, 0)


# -- qparams returns scales the functions take

QDTYPES = {"int8": (-128, 127), "uint8": (0, 255), "int4": (-8, 7), "uint4": (0, 15)}
EDGE_INPUTS = {
    "zeros": np.zeros((2, 6), np.float32),
    "float32 max both ways": np.array([[F32.max, -F32.max] * 3] * 2, np.float32),
    "3e38 both ways": np.array([[3e38, -3e38, 1, 0, -5, 2e38]] * 2, np.float32),
    "3e38 one way": np.array([[3e38, 1, 0, 5, 1e38, 2]] * 2, np.float32),
    "float64 within float32's range": np.array([[3e38, -3e38, 1, 0, -5, 1e-300]] * 2),
}


def _check_usable(x, scale, zp, qdtype, axis):
    qmin, qmax = QDTYPES[qdtype]
    s = np.atleast_1d(scale)
    assert np.isfinite(s).all() and (s > 0).all()
    q = quant.quantize(x, scale, zp, qdtype, axis=axis)
    assert q.min() >= qmin and q.max() <= qmax
    for xi in (x, x.astype(np.float64)):
        quant.fake_quantize(xi, scale, zp, qmin, qmax, axis=axis)
        quant.fake_quantize_backward(np.ones_like(xi), xi, scale, zp, qmin, qmax, axis=axis)
    if qdtype in ("int8", "uint8"):
        assert not np.isnan(quant.dequantize(q, scale, zp, axis=axis)).any()


@pytest.mark.parametrize("qdtype", list(QDTYPES))
@pytest.mark.parametrize("axis", [None, 0])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("method", ["minmax", "percentile", "mse"])
@pytest.mark.parametrize("name", list(EDGE_INPUTS))
def test_qparams_edge_inputs_give_usable_scales(name, method, symmetric, axis, qdtype):
    x = EDGE_INPUTS[name]
    scale, zp = quant.qparams(x, qdtype, axis=axis, symmetric=symmetric, method=method,
                              grid=5)
    _check_usable(x, scale, zp, qdtype, axis)


@pytest.mark.parametrize("qdtype", ["int8", "uint8"])
@pytest.mark.parametrize("axis", [None, 0])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("name", list(EDGE_INPUTS))
def test_qparams_edge_inputs_against_torch(name, symmetric, axis, qdtype, torch):
    """Equal to torch's observers where theirs is finite; where torch's max - min overflows
    float32 (its scale inf), the scale of the range, (max - min) / (qmax - qmin)."""
    from torch.ao.quantization import observer as tobs
    x = EDGE_INPUTS[name].astype(np.float32)
    kw = dict(dtype=torch.qint8 if qdtype == "int8" else torch.quint8)
    if axis is None:
        obs = tobs.MinMaxObserver(qscheme=torch.per_tensor_symmetric if symmetric
                                  else torch.per_tensor_affine, **kw)
    else:
        obs = tobs.PerChannelMinMaxObserver(ch_axis=axis, qscheme=torch.per_channel_symmetric
                                            if symmetric else torch.per_channel_affine, **kw)
    obs(torch.from_numpy(x))
    ts, tz = (t.numpy().reshape(-1) for t in obs.calculate_qparams())
    scale, zp = (np.atleast_1d(v) for v in quant.qparams(x, qdtype, axis=axis,
                                                         symmetric=symmetric))
    finite = np.isfinite(ts)
    np.testing.assert_array_equal(scale[finite].astype(np.float32), ts[finite])
    np.testing.assert_array_equal(zp[finite], tz[finite])
    lo = np.atleast_1d(np.minimum(x.min(axis=1 if axis == 0 else None), 0))
    hi = np.atleast_1d(np.maximum(x.max(axis=1 if axis == 0 else None), 0))
    with np.errstate(over="ignore"):
        overflows = np.isinf(hi - lo)  # in float32, as torch
    np.testing.assert_array_equal(~finite, overflows & (not symmetric))
    exact = (hi.astype(np.float64) - lo) / (QDTYPES[qdtype][1] - QDTYPES[qdtype][0])
    np.testing.assert_allclose(scale[~finite], exact[~finite], rtol=1e-6)


@pytest.mark.parametrize("method", ["minmax", "percentile", "mse"])
@pytest.mark.parametrize("axis", [None, 0])
def test_qparams_refuses_a_float64_range_beyond_float32(method, axis):
    x = np.array([[1e300, -2.0, 0.5, 3.0]] * 2)
    with pytest.raises(ValueError, match=r"x: its range reaches 1e\+300, beyond float32's "
                       r"\(magnitudes up to 3\.4028235e\+38\).*scale x into that range"):
        quant.qparams(x, "int8", axis=axis, method=method, percentile=100.0)


def test_qparams_percentile_takes_a_range_that_fits_float32():
    x = np.concatenate([[1e300], np.linspace(-1, 1, 100001)])
    scale, zp = quant.qparams(x, "int8", method="percentile", percentile=99.9)
    _check_usable(x, scale, zp, "int8", None)


@pytest.mark.parametrize("c", [0.5, 0.01, None])
def test_observer_keeps_a_finite_range(c):
    obs = quant.MovingAverageObserver("uint8", averaging_constant=c)
    for x in ([3e38], [-3e38], [F32.max, -F32.max]):
        obs.observe(np.array(x, np.float32))
        assert np.isfinite([obs.min_val, obs.max_val]).all()
        scale, zp = obs.qparams()
        _check_usable(np.array([3e38, -3e38], np.float32), scale, zp, "uint8", None)
    before = (obs.min_val, obs.max_val)
    with pytest.raises(ValueError, match=r"x: its range reaches -1e\+300"):
        obs.observe(np.array([-1e300, 1.0]))
    assert (obs.min_val, obs.max_val) == before


def test_observer_moving_average_matches_torch_unless_it_overflows(torch):
    from torch.ao.quantization import observer as tobs
    ours = quant.MovingAverageObserver("uint8", averaging_constant=0.25)
    theirs = tobs.MovingAverageMinMaxObserver(averaging_constant=0.25)
    for x in ([1e38, 3.0], [-2e38, 1.0], [5.0, 6.0]):
        ours.observe(np.array(x, np.float32))
        theirs(torch.tensor(x))
        assert (ours.min_val, ours.max_val) == (theirs.min_val.item(), theirs.max_val.item())
    old_max = ours.max_val
    ours.observe(np.array([-3e38], np.float32))  # -3e38 - max overflows torch's float32
    theirs(torch.tensor([-3e38]))
    assert theirs.max_val.item() == -np.inf
    assert ours.min_val == theirs.min_val.item()
    low = float(np.float32(-3e38))
    assert ours.max_val == float(np.float32(old_max + 0.25 * (low - old_max)))
