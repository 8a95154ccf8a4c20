"""Healing: distil an inexactly converted model back toward the original, sublayer by sublayer."""
