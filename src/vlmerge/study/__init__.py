"""vlmerge.study"""
