"""Can the output keep the source's shard layout, whose bytes ``mirror`` has already copied?

Each source tensor's bytes sit at a slot in the output. An output tensor that is an unchanged copy of a
source tensor (same dtype) takes that tensor's slot and is not written again. Every other output tensor
takes a free slot of its size (its own source tensor's first) and is written over it, or, if none is free,
goes after the last shard's data. A file where a slot would stay empty (a source tensor the output drops,
with nothing of its size to take its place: safetensors files may not have holes) is written afresh under
its name, its tensors one after another; the other files keep their bytes. The layout is refused (None)
where no file would keep its bytes, where a header would not fit its reserved room, or where a file would
exceed the shard size.
"""

from __future__ import annotations

import json
import struct
from collections import defaultdict
from collections.abc import Mapping, Sequence

from .mirror import MirroredFile
from .safetensors_file import NAMES, header_bytes
from .shard_writer import PlannedTensor, ShardFile, ShardLayout
from .source_weights import CheckpointWeights


def mirror_layout(files: Sequence[MirroredFile], planned: Sequence[PlannedTensor], weights: CheckpointWeights,
                  sources: Mapping[str, str], unchanged: frozenset[str], max_bytes: int) -> ShardLayout | None:
    """The layout, or None. ``sources[output]`` is the source tensor an output is made from (its first read);
    outputs in ``unchanged`` are those bytes as they are."""
    index_of = {file.source: index for index, file in enumerate(files)}
    slots: dict[str, tuple[int, int, int]] = {}  # source name -> (file index, offset in its data, bytes)
    for name, tensor in weights.tensors.items():
        if tensor.entry is None or tensor.file not in index_of:
            return None
        file = files[index_of[tensor.file]]
        slots[name] = (index_of[tensor.file], tensor.entry.begin - file.source_data_start, tensor.nbytes)

    taken: set[str] = set()
    places: dict[str, tuple[int, int]] = {}  # output name -> (file index, offset in its data)
    in_place = set()
    for tensor in planned:
        source = sources.get(tensor.name) if tensor.name in unchanged else None
        if source in slots and source not in taken and slots[source][2] == tensor.nbytes:
            taken.add(source)
            places[tensor.name] = slots[source][:2]
            in_place.add(tensor.name)
    free_by_size: dict[int, list[str]] = defaultdict(list)
    for name, (_, _, nbytes) in slots.items():
        if name not in taken:
            free_by_size[nbytes].append(name)
    appended = []
    for tensor in planned:
        if tensor.name in places:
            continue
        free = free_by_size.get(tensor.nbytes)
        if free:
            own = sources.get(tensor.name)
            slot = own if own in free else free[0]
            free.remove(slot)
            places[tensor.name] = slots[slot][:2]
        else:
            appended.append(tensor)
    holed = {slots[name][0] for size, names in free_by_size.items() if size for name in names}
    if len(holed) == len(files):
        return None  # nothing would keep its bytes: the planned layout names and sizes shards better

    last = len(files) - 1
    end = files[last].data_bytes
    for tensor in appended:
        places[tensor.name] = (last, end)
        end += tensor.nbytes
    sizes = [file.data_bytes for file in files]
    sizes[last] = end
    by_name = {tensor.name: tensor for tensor in planned}
    shard_files = []
    absolute: dict[str, tuple[int, int]] = {}
    for index, file in enumerate(files):
        entries = {name: (by_name[name], offset) for name, (at, offset) in places.items() if at == index}
        if index in holed:
            rewritten = _rewritten(file.name, entries, max_bytes)
            if rewritten is None:
                return None
            shard_file, offsets = rewritten
            shard_files.append(shard_file)
            absolute.update({name: (index, offset) for name, offset in offsets.items()})
            in_place.difference_update(offsets)
            continue
        header = _header(entries, file.header_room)
        if header is None or (sizes[index] > max_bytes and len(entries) > 1):
            return None  # --max-shard-size asks for smaller shards than the source's
        shard_files.append(ShardFile(file.name, header, file.data_start + sizes[index], fresh=False))
        absolute.update({name: (index, file.data_start + offset) for name, (_, offset) in entries.items()})
    return ShardLayout(tuple(shard_files), absolute, frozenset(in_place))


def _rewritten(name: str, entries: Mapping[str, tuple[PlannedTensor, int]], max_bytes: int
               ) -> tuple[ShardFile, dict[str, int]] | None:
    """A file with a hole, written afresh: its tensors in their source order, packed; None if it is left empty
    or too large."""
    ordered = sorted(entries, key=lambda name: entries[name][1])
    header, offsets = header_bytes({name: (entries[name][0].dtype, entries[name][0].shape) for name in ordered},
                                   {"format": "pt"})
    size = len(header) + sum(entries[name][0].nbytes for name in ordered)
    if not ordered or (size > max_bytes and len(ordered) > 1):
        return None
    return ShardFile(name, header, size), {name: len(header) + offsets[name][0] for name in ordered}


def _header(entries: Mapping[str, tuple[PlannedTensor, int]], room: int) -> bytes | None:
    """The 8-byte length and the JSON header padded with spaces to exactly ``room`` bytes, or None if too long."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    for name, (tensor, offset) in sorted(entries.items(), key=lambda item: item[1][1]):
        header[name] = {"dtype": NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + tensor.nbytes]}
    raw = json.dumps(header, separators=(",", ":")).encode()
    if len(raw) > room:
        return None
    return struct.pack("<Q", room) + raw + b" " * (room - len(raw))
