"""Readers: every supported file format -> list of `Frame` in eV, Å, eV/Å, eV/Å^3.

Formats:
    extxyz / xyz       ase; energy/forces/stress/magmoms key names configurable
    .npz (rMD17)       nuclear_charges, coords (Å), energies (kcal/mol), forces (kcal/mol/Å)
    DeePMD directory   type.raw, type_map.raw, set.*/{box,coord,energy,force[,virial][,spin]}.npy
                       (spin.npy: (frames, 3 N) per-atom moment vectors, μB, as deepmd-kit's spin data)
    mlearn .json       records of pymatgen structure + outputs.{energy, forces, virial_stress (kbar)}
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import ase.data
import ase.io
import ase.units
import numpy as np

from sparse_eqv.data.frames import Frame
from sparse_eqv.data.graph import MIN_DISTANCE, neighbour_edges
from sparse_eqv.errors import DataError

KCAL_PER_MOL = ase.units.kcal / ase.units.mol  # eV
KBAR = 0.1 * ase.units.GPa  # eV/Å^3


def read_frames(path: str | Path, *, require_energy: bool = False, **label_keys: str) -> list[Frame]:
    """Read every frame of `path`, choosing the reader by its form.

    Args:
        path: extxyz/xyz file, rMD17 .npz, DeePMD directory, or mlearn .json.
        require_energy: raise DataError when a frame has no energy label.
        label_keys: extxyz label names, `read_extxyz`'s energy_key, forces_key,
            stress_key and magmoms_key (magnetic moments: a per-atom array,
            (N,) or (N, 3) μB, e.g. "magmoms" or "initial_magmoms"); the
            other formats have fixed labels. Any other name is a TypeError.
    """
    inspect.signature(read_extxyz).bind(path, **label_keys)  # TypeError on a name read_extxyz lacks
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if path.is_dir():
        frames = read_deepmd(path)
    elif path.suffix == ".npz":
        frames = read_rmd17(path)
    elif path.suffix == ".json":
        frames = read_mlearn_json(path)
    else:
        frames = read_extxyz(path, require_energy=require_energy, **label_keys)
    if not frames:
        raise DataError(f"{path}: contains no frames")
    for frame in frames:
        _validate(frame, require_energy)
    return frames


def _validate(frame: Frame, require_energy: bool) -> None:
    n = frame.num_atoms
    if frame.positions.shape != (n, 3):
        raise DataError(f"{frame.source}: positions have shape {frame.positions.shape}, expected ({n}, 3)")
    if not np.all(np.isfinite(frame.positions)):
        atom = int(np.argwhere(~np.isfinite(frame.positions))[0][0])
        raise DataError(f"{frame.source}: position of atom {atom} is not finite (NaN or inf)")
    neighbour_edges(frame, MIN_DISTANCE)  # DataError naming two atoms closer than MIN_DISTANCE
    if require_energy and frame.energy is None:
        raise DataError(f"{frame.source}: frame has no energy label")
    if frame.energy is not None and not np.isfinite(frame.energy):
        raise DataError(f"{frame.source}: energy is not finite ({frame.energy})")
    if frame.forces is not None:
        if frame.forces.shape != (n, 3):
            raise DataError(f"{frame.source}: forces have shape {frame.forces.shape}, expected ({n}, 3)")
        if not np.all(np.isfinite(frame.forces)):
            raise DataError(f"{frame.source}: forces contain NaN or inf")
    if frame.stress is not None and not np.all(np.isfinite(frame.stress)):
        raise DataError(f"{frame.source}: stress contains NaN or inf")
    if frame.magmoms is not None:
        if np.shape(frame.magmoms) not in ((n,), (n, 3)):
            raise DataError(
                f"{frame.source}: magnetic moments have shape {np.shape(frame.magmoms)}, expected ({n},) or ({n}, 3)"
            )
        if not np.all(np.isfinite(frame.magmoms)):
            raise DataError(f"{frame.source}: magnetic moments contain NaN or inf")


def _stress_3x3(value, source: str) -> np.ndarray:
    value = np.asarray(value, dtype=np.float64).reshape(-1)
    if value.size == 9:
        return value.reshape(3, 3)
    if value.size == 6:  # Voigt: xx yy zz yz xz xy
        xx, yy, zz, yz, xz, xy = value
        return np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])
    raise DataError(f"{source}: stress has {value.size} components, expected 6 (Voigt) or 9")


def read_extxyz(
    path: str | Path,
    *,
    energy_key: str = "energy",
    forces_key: str = "forces",
    stress_key: str = "stress",
    require_energy: bool = False,
    magmoms_key: str = "magmoms",
) -> list[Frame]:
    """Frames of an extended-XYZ file; labels read from info/arrays by key name
    (per-atom moments: the array `magmoms_key`, or ase's calculator result).

    With `require_energy`, a frame without `energy_key` raises a DataError
    that lists the scalar keys the frame does have.
    """
    path = Path(path)
    try:
        images = ase.io.read(path, index=":", format="extxyz")
    except Exception as error:  # ase raises many types for malformed files
        raise DataError(f"{path}: cannot be read as extxyz ({error})") from error
    frames = []
    for index, atoms in enumerate(images):
        source = f"{path}:{index}"
        info, arrays = dict(atoms.info), dict(atoms.arrays)
        if atoms.calc is not None:  # ase moves energy/forces/stress into a SinglePointCalculator
            results = atoms.calc.results
            info.update({k: v for k, v in results.items() if k != "forces"})
            if "forces" in results:
                arrays["forces"] = results["forces"]
        energy = info.get(energy_key)
        if energy is None and require_energy:
            present = sorted(k for k, v in info.items() if np.ndim(v) == 0)
            raise DataError(
                f"{source}: no energy under key {energy_key!r}; scalar keys present: "
                f"{', '.join(present) or 'none'} (choose one with --energy-key)"
            )
        forces, stress = arrays.get(forces_key), info.get(stress_key)
        frames.append(
            Frame(
                numbers=atoms.numbers.astype(np.int64),
                positions=np.asarray(atoms.positions, dtype=np.float64),
                cell=np.asarray(atoms.cell.array, dtype=np.float64),
                pbc=np.asarray(atoms.pbc, dtype=bool),
                energy=None if energy is None else float(energy),
                forces=None if forces is None else np.asarray(forces, dtype=np.float64),
                stress=None if stress is None else _stress_3x3(stress, source),
                magmoms=_magmoms(arrays.get(magmoms_key, info.get(magmoms_key))),
                source=source,
            )
        )
    return frames


def _magmoms(value) -> np.ndarray | None:
    return None if value is None else np.asarray(value, dtype=np.float64)


def read_rmd17(path: str | Path) -> list[Frame]:
    """rMD17 .npz: kcal/mol and kcal/mol/Å converted to eV and eV/Å."""
    path = Path(path)
    with np.load(path) as data:
        missing = [k for k in ("nuclear_charges", "coords") if k not in data]
        if missing:
            raise DataError(f"{path}: rMD17 npz lacks {', '.join(missing)} (keys: {', '.join(data.files)})")
        numbers = np.asarray(data["nuclear_charges"], dtype=np.int64)
        coords = np.asarray(data["coords"], dtype=np.float64)
        energies = np.asarray(data["energies"], dtype=np.float64) * KCAL_PER_MOL if "energies" in data else None
        forces = np.asarray(data["forces"], dtype=np.float64) * KCAL_PER_MOL if "forces" in data else None
    return [
        Frame(
            numbers=numbers,
            positions=coords[i],
            cell=np.zeros((3, 3)),
            pbc=np.zeros(3, dtype=bool),
            energy=None if energies is None else float(energies[i]),
            forces=None if forces is None else forces[i],
            source=f"{path}:{i}",
        )
        for i in range(coords.shape[0])
    ]


def read_deepmd(path: str | Path) -> list[Frame]:
    """DeePMD npy system: virial (eV) -> stress = -virial / volume (eV/Å^3)."""
    path = Path(path)
    for name in ("type.raw", "type_map.raw"):
        if not (path / name).exists():
            raise DataError(f"{path}: DeePMD directory lacks {name}")
    types = np.loadtxt(path / "type.raw", dtype=np.int64, ndmin=1)
    type_map = (path / "type_map.raw").read_text().split()
    try:
        numbers = np.array([ase.data.atomic_numbers[type_map[t]] for t in types], dtype=np.int64)
    except (KeyError, IndexError) as error:
        raise DataError(f"{path}: type.raw/type_map.raw do not name chemical elements ({error})") from error
    sets = sorted(p for p in path.glob("set.*") if p.is_dir())
    if not sets:
        raise DataError(f"{path}: DeePMD directory has no set.* folders")
    n = len(numbers)
    frames = []
    for set_dir in sets:
        def load(name, width):
            file = set_dir / f"{name}.npy"
            if not file.exists():
                return None
            array = np.load(file).astype(np.float64)
            if width and array.size != array.shape[0] * width:
                raise DataError(
                    f"{file}: shape {array.shape} does not fit {n} atoms ({width} numbers per frame expected)"
                )
            return array.reshape(array.shape[0], width) if width else array.reshape(-1)

        coords = load("coord", 3 * n)
        boxes = load("box", 9)
        if coords is None or boxes is None:
            raise DataError(f"{set_dir}: needs coord.npy and box.npy")
        energies, forces, virials, spins = load("energy", 0), load("force", 3 * n), load("virial", 9), load("spin", 3 * n)
        for i in range(coords.shape[0]):
            cell = boxes[i].reshape(3, 3)
            volume = abs(np.linalg.det(cell))
            stress = None if virials is None else -virials[i].reshape(3, 3) / volume
            frames.append(
                Frame(
                    numbers=numbers,
                    positions=coords[i].reshape(n, 3),
                    cell=cell,
                    pbc=np.ones(3, dtype=bool),
                    energy=None if energies is None else float(energies[i]),
                    forces=None if forces is None else forces[i].reshape(n, 3),
                    stress=stress,
                    magmoms=None if spins is None else spins[i].reshape(n, 3),
                    source=f"{set_dir}:{i}",
                )
            )
    return frames


def read_mlearn_json(path: str | Path) -> list[Frame]:
    """mlearn JSON records; VASP virial_stress (kbar, xx yy zz xy yz zx,
    positive under compression) -> ASE-sign stress in eV/Å^3."""
    path = Path(path)
    try:
        records = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not valid JSON ({error})") from error
    frames = []
    for index, record in enumerate(records):
        source = f"{path}:{index}"
        try:
            structure = record["structure"]
            cell = np.asarray(structure["lattice"]["matrix"], dtype=np.float64)
            sites = structure["sites"]
            numbers = np.array([ase.data.atomic_numbers[s["species"][0]["element"]] for s in sites], dtype=np.int64)
            positions = np.array([s["xyz"] for s in sites], dtype=np.float64)
            outputs = record.get("outputs", {})
        except (KeyError, TypeError, IndexError) as error:
            raise DataError(f"{source}: not an mlearn record (missing {error})") from error
        stress = None
        if outputs.get("virial_stress") is not None:
            xx, yy, zz, xy, yz, zx = np.asarray(outputs["virial_stress"], dtype=np.float64)
            stress = -KBAR * np.array([[xx, xy, zx], [xy, yy, yz], [zx, yz, zz]])
        frames.append(
            Frame(
                numbers=numbers,
                positions=positions,
                cell=cell,
                pbc=np.ones(3, dtype=bool),
                energy=None if outputs.get("energy") is None else float(outputs["energy"]),
                forces=None if outputs.get("forces") is None else np.asarray(outputs["forces"], dtype=np.float64),
                stress=stress,
                source=source,
            )
        )
    return frames
