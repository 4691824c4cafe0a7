"""Built-in sample data: chest phantoms (`phantoms`), their DICOM writer (`phantom_dicom`) and
the sample set generator (`generate`)."""
