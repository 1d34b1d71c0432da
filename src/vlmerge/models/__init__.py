"""vlmerge.models"""
