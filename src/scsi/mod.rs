//! SCSI: CDB builders, sense decoding, INQUIRY/VPD parsing.
