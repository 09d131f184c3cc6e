"""A toy task a random-init tiny model learns in a few steps.

Run with `rollout.stop=[' ']`: a response ends at its first space, so its length is decided
token by token (each sampled token either contains a space and ends it, or not). The reward
is the response length in characters (capped): the policy must learn to avoid the ~40% of
byte-level BPE tokens that contain a space. Dense, and every token gets direct credit.
"""


def score(data_source, response, ground_truth, extra_info):
    return min(len(response.strip()), 40) / 40
