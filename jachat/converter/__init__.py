"""Turn a Hugging Face GPT-NeoX checkpoint (rinna's chat model) into a CTranslate2 model folder."""

from jachat.manifest import MANIFEST_NAME, Manifest, ManifestError, read_manifest, verify_manifest

__all__ = ["MANIFEST_NAME", "Manifest", "ManifestError", "read_manifest", "verify_manifest"]
