"""QuEST selective finetuning (Stage B and Stage C)."""

from quest_export.finetune.quest import FinetuneReport, finetune_

__all__ = ["FinetuneReport", "finetune_"]
