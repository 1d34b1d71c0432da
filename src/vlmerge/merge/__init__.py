"""vlmerge.merge"""
