"""Can the output keep the source's shard layout, whose bytes ``mirror`` has already copied?

Each source tensor's bytes sit at a slot in the output. An output tensor that is an unchanged copy of a
source tensor (same dtype) takes that tensor's slot and is not written again. Every other output tensor
takes a free slot of its size (its own source tensor's first) and is written over it, or, if none is free,
goes after the last shard's data. The layout is refused (None) where a slot would stay empty (a source
tensor the output drops, with nothing of its size to take its place: safetensors files may not have
holes), where a header would not fit its reserved room, or where a file would exceed the shard size.
"""

from __future__ import annotations

import json
import struct
from collections import defaultdict
from collections.abc import Mapping, Sequence

from .mirror import MirroredFile
from .safetensors_file import NAMES
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
    if any(names for size, names in free_by_size.items() if size):
        return None  # a hole

    last = len(files) - 1
    end = files[last].data_bytes
    for tensor in appended:
        places[tensor.name] = (last, end)
        end += tensor.nbytes
    sizes = [file.data_bytes for file in files]
    sizes[last] = end
    by_name = {tensor.name: tensor for tensor in planned}
    shard_files = []
    for index, file in enumerate(files):
        entries = {name: (by_name[name], offset) for name, (at, offset) in places.items() if at == index}
        header = _header(entries, file.header_room)
        if header is None or (sizes[index] > max_bytes and len(entries) > 1):
            return None  # --max-shard-size asks for smaller shards than the source's
        shard_files.append(ShardFile(file.name, header, file.data_start + sizes[index], fresh=False))
    absolute = {name: (index, files[index].data_start + offset) for name, (index, offset) in places.items()}
    return ShardLayout(tuple(shard_files), absolute, frozenset(in_place))


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
