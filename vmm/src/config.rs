//! Parsing and validation of user-supplied VM configuration (CLI values).

use thiserror::Error;

/// A bad value on the command line; each message names the value.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error(
        "invalid size '{0}': expected a number with an optional K, M, G or T suffix (e.g. 512M, 4G)"
    )]
    MalformedSize(String),
    #[error("invalid size '{0}': too large")]
    SizeOverflow(String),
    #[error("invalid memory size '{0}': must be at least 64M")]
    MemoryTooSmall(String),
    #[error("invalid memory size '{0}': must be a multiple of 4K")]
    MemoryUnaligned(String),
    #[error("invalid --cpus value {0}: must be between 1 and {max}", max = MAX_CPUS)]
    BadCpuCount(u32),
}

/// Most vCPUs we support (APIC IDs fit in the 8-bit xAPIC ID and the MADT helper).
pub const MAX_CPUS: u32 = 64;
/// Smallest guest memory a stock Debian kernel with our initramfs boots in.
pub const MIN_MEMORY: u64 = 64 << 20;
/// Largest guest memory: RAM must end below the 64-bit PCI window (layout.rs).
pub const MAX_MEMORY: u64 = 256 << 30;

/// Parses a size such as `512M`, `4G`, `4GiB`, `1048576` (bytes) into bytes.
pub fn parse_size(text: &str) -> Result<u64, ConfigError> {
    let trimmed = text.trim();
    let digits_end = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (digits, suffix) = trimmed.split_at(digits_end);
    if digits.is_empty() {
        return Err(ConfigError::MalformedSize(text.to_string()));
    }
    let shift = match suffix.to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => return Err(ConfigError::MalformedSize(text.to_string())),
    };
    let value: u64 = digits
        .parse()
        .map_err(|_| ConfigError::SizeOverflow(text.to_string()))?;
    value
        .checked_mul(1u64 << shift)
        .ok_or_else(|| ConfigError::SizeOverflow(text.to_string()))
}

/// Parses and validates a guest memory size.
pub fn parse_memory_size(text: &str) -> Result<u64, ConfigError> {
    let bytes = parse_size(text)?;
    if bytes < MIN_MEMORY {
        return Err(ConfigError::MemoryTooSmall(text.to_string()));
    }
    if bytes % 4096 != 0 {
        return Err(ConfigError::MemoryUnaligned(text.to_string()));
    }
    if bytes > MAX_MEMORY {
        return Err(ConfigError::SizeOverflow(text.to_string()));
    }
    Ok(bytes)
}

/// Validates a vCPU count.
pub fn validate_cpus(cpus: u32) -> Result<u32, ConfigError> {
    if cpus == 0 || cpus > MAX_CPUS {
        return Err(ConfigError::BadCpuCount(cpus));
    }
    Ok(cpus)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_with_suffixes() {
        assert_eq!(parse_size("4G"), Ok(4 << 30));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
    }

    #[test]
    fn malformed_sizes_are_rejected_with_the_value() {
        for bad in ["", "G", "4X", "-1G", "4.5G", "four"] {
            let err = parse_size(bad).unwrap_err();
            assert_eq!(err, ConfigError::MalformedSize(bad.to_string()));
            assert!(err.to_string().contains(&format!("'{bad}'")));
        }
        assert!(matches!(
            parse_size("99999999999999999999G"),
            Err(ConfigError::SizeOverflow(_))
        ));
        assert!(matches!(
            parse_size("99999999999T"),
            Err(ConfigError::SizeOverflow(_))
        ));
    }

    #[test]
    fn memory_limits() {
        assert!(matches!(
            parse_memory_size("1M"),
            Err(ConfigError::MemoryTooSmall(_))
        ));
        assert!(matches!(
            parse_memory_size("67108865"),
            Err(ConfigError::MemoryUnaligned(_))
        ));
        assert_eq!(parse_memory_size("4G"), Ok(4 << 30));
    }

    #[test]
    fn cpu_counts() {
        assert_eq!(validate_cpus(0), Err(ConfigError::BadCpuCount(0)));
        assert_eq!(validate_cpus(65), Err(ConfigError::BadCpuCount(65)));
        assert_eq!(validate_cpus(2), Ok(2));
        assert!(
            validate_cpus(0)
                .unwrap_err()
                .to_string()
                .contains("--cpus value 0")
        );
    }
}
