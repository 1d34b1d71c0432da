"""vlmerge: merge modality-specific vision-language transformers into one modality-agnostic transformer."""

__version__ = "0.1.0"
