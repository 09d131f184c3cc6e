"""A toy reward a random-init tiny model can learn in a few steps: the fraction of the
response's characters that are spaces. About half of the byte-level BPE vocabulary starts
with a space, so the signal is dense and differs across samples from the first step."""


def score(data_source, response, ground_truth, extra_info):
    if not response:
        return 0.0
    return response.count(" ") / len(response)
