"""Reward-model worker group: a Hugging Face sequence-classification model scores responses.

Classic RLHF PPO needs it. Each rank holds the whole reward model (inference only, no
optimizer) and scores its slice of the batch; the score is the logit of the last token.
The text scored is the policy's prompt (decoded, chat template included) + the response,
re-tokenized with the reward model's own tokenizer.
"""

from __future__ import annotations

import torch

from verlcli.data.batch import Batch
from verlcli.distributed import Worker, register


class RewardModelWorker(Worker):
    def setup(self, cfg: dict):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from verlcli.config.schema import Config
        from verlcli.models.resolve import resolve_model

        self.cfg = Config.model_validate(cfg)
        policy_path = resolve_model(self.cfg.model.path)
        rm_path = resolve_model(self.cfg.reward.model.path)
        trust = self.cfg.model.trust_remote_code
        self.policy_tok = AutoTokenizer.from_pretrained(str(policy_path), trust_remote_code=trust)
        self.tok = AutoTokenizer.from_pretrained(str(rm_path), trust_remote_code=trust)
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.tok.padding_side = "right"
        dtype = torch.bfloat16 if self.device_type == "cuda" else torch.float32
        self.model = AutoModelForSequenceClassification.from_pretrained(str(rm_path), num_labels=1, dtype=dtype,
                                                                        trust_remote_code=trust)
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tok.pad_token_id
        self.model.to(self.device).eval()
        return True

    @register(dispatch="dp")
    def compute_rm_scores(self, batch: Batch) -> Batch:
        texts = [self.policy_tok.decode(list(p), skip_special_tokens=False) + r
                 for p, r in zip(batch["prompt_ids"], batch["response_text"])]
        size = self.cfg.reward.model.micro_batch_sequences_per_device
        scores = []
        with torch.no_grad():
            for i in range(0, len(texts), size):
                enc = self.tok(texts[i : i + size], return_tensors="pt", padding=True, truncation=True,
                               max_length=self.cfg.data.max_prompt_tokens + self.cfg.data.max_response_tokens + 64)
                logits = self.model(**{k: v.to(self.device) for k, v in enc.items()}).logits
                scores.append(logits[:, 0].float().cpu())
        return Batch({"rm_scores": torch.cat(scores) if scores else torch.zeros(0)})
