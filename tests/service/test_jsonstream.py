"""A JSON array read an element at a time: the same elements as `json.loads`, wherever the reads end."""

import io
import json
import random

import pytest

from vggt_cache.service.jsonstream import ArrayStream, MalformedSample


class ShortReads(io.BytesIO):
    """A file whose reads return a few bytes at most, as a pipe or a slow network file system may."""

    def __init__(self, data: bytes, seed: int) -> None:
        super().__init__(data)
        self.rng = random.Random(seed)

    def read(self, size: int | None = -1) -> bytes:
        return super().read(self.rng.randint(1, 7))


SEPARATORS = [",", " , ", "\n,\n", ",\t", "\r\n,  ", "  ,"]


@pytest.mark.parametrize("seed", range(12))
def test_the_elements_are_those_json_reads_whatever_the_spaces_and_wherever_a_read_ends(seed):
    rng = random.Random(seed)
    elements = [{"images": [f"ep_{i}/rgb_{j}.jpg" for j in range(rng.randint(1, 9))]} for i in range(40)]
    elements += [7, "text", [1, 2.5], None, 12345]  # a number at a read's end may go on
    rng.shuffle(elements)
    text = rng.choice(["[", "[ ", "[\n"]) + "".join(
        json.dumps(e) + (rng.choice(SEPARATORS) if i < len(elements) - 1 else "") for i, e in enumerate(elements)
    )
    text += rng.choice(["]", " ]", "\n]\n"])
    data = text.encode()
    for f in (io.BytesIO(data), ShortReads(data, seed)):
        stream = ArrayStream(f, 1 << 16).elements()
        assert stream is not None
        assert list(stream) == json.loads(text)


@pytest.mark.parametrize(
    "text, said",
    [
        ('[{"a": 1} {"b": 2}]', "expected ',' or ']'"),
        ('[{"a": 1},]', "not valid JSON"),
        ('[{"a": 1},,{"b": 2}]', "not valid JSON"),
        ('[{"a": 1}, {"b": 2}', "expected ',' or ']'"),
    ],
)
def test_what_is_not_an_array_says_so_after_the_elements_before_it(text, said):
    for f in (io.BytesIO(text.encode()), ShortReads(text.encode(), 1)):
        stream = ArrayStream(f, 1 << 16).elements()
        assert stream is not None
        assert next(stream) == {"a": 1}
        with pytest.raises(MalformedSample, match=said):
            list(stream)
