"""The synthesis server: an HTTP JSON API and Elijah's 8021 protocol over one SynthesisManager."""
